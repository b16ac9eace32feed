"""The op rules, one module per op family, and their registry (``registry.py``).

Importing this package registers the built-in rules for torch's own ops; the rules for torchvision's and
timm's ops (``torchvision.py``, ``timm.py``) are imported the first time a graph holds one of their ops.
"""
from . import attention, creation, elementwise, layers, norms, pooling, reductions, shapes, values  # noqa: F401
from .layers import conv, linear
from .registry import DEFAULT, Registry, register_rule
from .shapes import channels_last_window

__all__ = ["DEFAULT", "Registry", "channels_last_window", "conv", "linear", "register_rule"]
