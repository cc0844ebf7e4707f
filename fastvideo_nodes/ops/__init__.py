"""The operations the models are built from: linear layers whose weights may be stored as fp8
(`linear.py`), and one function per fused operation (`fused.py`), each picking custom op /
Triton / torch inside."""
from .fused import (
    apply_rope,
    channels_last,
    layer_norm_affine,
    layer_norm_modulate,
    linear_gelu,
    residual_layer_norm,
    rms_norm,
    rms_norm_channels,
    rms_norm_rope,
)
from .linear import Linear

__all__ = ["Linear", "apply_rope", "channels_last", "layer_norm_affine", "layer_norm_modulate", "linear_gelu",
           "residual_layer_norm", "rms_norm", "rms_norm_channels", "rms_norm_rope"]
