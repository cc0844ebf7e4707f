"""Fill a model built on the meta device from a stream of tensors, one at a time.

Loading never holds two full copies of the weights in host memory: each tensor is read from
safetensors, cast, moved to its device and assigned before the next one is read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import ModelFileError
from ..ops.linear import FP8_DTYPES, Linear, quantize_fp8


def materialize(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, role: str,
                dtype: torch.dtype, device: torch.device | str, keep_fp32: Callable[[str], bool] = lambda n: False,
                weight_dtype: torch.dtype | None = None) -> None:
    """Assign every parameter/buffer of `module` (built on meta) from `tensors`.

    dtype: compute dtype for ordinary floating tensors. keep_fp32(name): tensors kept in float32
    (modulation tables, norms). weight_dtype: store Linear weights in this dtype (e.g. fp8,
    then with one scale per output channel). fp8 weights found in the file stay fp8, with their
    `scale_weight` (ComfyUI scaled fp8) kept.
    """
    expected = {n for n, _ in module.named_parameters()} | {n for n, b in module.named_buffers() if b is not None}
    seen = set()
    for name, t in tensors:
        mod_name, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(mod_name) if mod_name else module
        except AttributeError:
            owner = None
        if owner is None or not (hasattr(owner, attr) or (attr == "scale_weight" and isinstance(owner, Linear))):
            raise ModelFileError(f"{role}: unexpected tensor {name!r} {tuple(t.shape)} for this architecture; "
                                 "the file does not match the model kind it was given as.")
        is_linear_weight = isinstance(owner, Linear) and attr == "weight"
        if attr == "scale_weight":
            t = t.to(torch.float32)
        elif is_linear_weight and t.dtype in FP8_DTYPES:
            pass  # stays fp8; dequantised at use
        elif keep_fp32(name):
            t = t.to(torch.float32)
        elif is_linear_weight and weight_dtype in FP8_DTYPES:
            t, scale = quantize_fp8(t, weight_dtype)  # one scale per output channel
            owner.register_buffer("scale_weight", scale.to(device))
        elif is_linear_weight and weight_dtype is not None:
            t = t.to(dtype).to(weight_dtype) if t.dtype != weight_dtype else t
        elif t.is_floating_point():
            t = t.to(dtype)
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and attr != "scale_weight" and tuple(current.shape) != tuple(t.shape):
            raise ModelFileError(f"{role}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(current.shape)}; the file does not match the detected configuration.")
        t = t.to(device)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(t, requires_grad=False))
        else:
            owner.register_buffer(attr, t) if attr in owner._buffers else setattr(owner, attr, t)
        seen.add(name)
    missing = sorted(expected - seen - {n for n in expected if n.endswith("scale_weight")})
    if missing:
        raise ModelFileError(f"{role}: the file lacks {len(missing)} tensors this model needs, e.g. "
                             f"{missing[:3]}; it may be incomplete or of another model kind.")
    # Buffers computed at init (not stored in files) are rebuilt by the model on its device.
    module.eval().requires_grad_(False)
