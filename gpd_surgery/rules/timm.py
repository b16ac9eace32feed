"""Rules for timm's own layers: norm + activation and same-padding convs (leaf modules timm declares for
fx), weight-standardised convs, and the window and block (un)partitions it wraps from tracing. Loaded at the
first node of a timm op (see ``registry.LIBRARY_RULES``), so that importing gpd-surgery does not import
timm."""
from __future__ import annotations

import functools
import importlib

from timm.layers import norm_act as _norm_act
from timm.layers import std_conv as _std_conv
from timm.layers.conv2d_same import Conv2dSame as _Conv2dSame
from timm.layers.padding import pad_same

from .layers import conv, weight_standardised
from .norms import batch_norm, group_norm
from .registry import DEFAULT, builtin
from .shapes import channels_last_window

builtin(_norm_act.BatchNormAct2d)(batch_norm)  # the activation acts per element
builtin(_norm_act.GroupNormAct)(group_norm)
builtin(_Conv2dSame)(conv)  # an nn.Conv2d whose padding is computed from the input's size: spatial only


# timm's same-padding forms pad from the input's size before the conv, as pad_same does.
std_conv = weight_standardised(lambda t: functools.partial(pad_same, kernel_size=t.kernel_size, stride=t.stride,
                                                           dilation=t.dilation) if getattr(t, "same_pad", False)
                               else None)


# Leaves: StdConv2d and ScaledStdConv2d are traced through otherwise, their standardisation a batch_norm over a
# computed weight that no rule can see as one op.
DEFAULT.register(_std_conv.StdConv2d, _std_conv.StdConv2dSame, _std_conv.ScaledStdConv2d,
                 _std_conv.ScaledStdConv2dSame)(std_conv)


def _register_window_functions() -> None:
    """timm's window and block (un)partitions, (B, H, W, C) <-> windows of (..., C), by model module."""
    modules = {
        "swin_transformer": ("window_partition", "window_reverse"),
        "swin_transformer_v2": ("window_partition", "window_reverse"),
        "swin_transformer_v2_cr": ("window_partition", "window_reverse"),
        "maxxvit": ("window_partition", "window_reverse", "grid_partition", "grid_reverse"),
        "gcvit": ("window_partition", "window_reverse"), "davit": ("window_partition", "window_reverse"),
        "nest": ("blockify", "deblockify"),
    }
    for module, names in modules.items():
        try:
            mod = importlib.import_module(f"timm.models.{module}")
        except ImportError:  # timm's models come and go between versions
            continue
        builtin(*[getattr(mod, f) for f in names if hasattr(mod, f)])(channels_last_window)


_register_window_functions()
