"""Rules for Hugging Face transformers' own layers: BiT's weight-standardised convolution. Loaded at the first
node of a transformers op (see ``registry.LIBRARY_RULES``), so that importing gpd-surgery does not import
transformers."""
from __future__ import annotations

from transformers.models.bit import modeling_bit as _bit

from .layers import weight_standardised
from .registry import DEFAULT

# Its same padding is a module (DynamicPad2d, or None), applied to the input before the conv.
DEFAULT.register(_bit.WeightStandardizedConv2d)(weight_standardised(lambda t: t.pad))
