"""FastVideo LoRA: model in, model out, with one more LoRA on the model's list.

The node never touches the incoming model: it returns `model.with_loras(...)`, a generator that
shares the loaded weights and carries its own list, so a graph that samples the plain model and
the LoRA model side by side gets both right (the engine patches the shared DiT to the list of
whichever model samples). Chained nodes stack their LoRAs in order.
"""
from __future__ import annotations

import math
import numbers

from . import comfy_api
from .model_nodes import CATEGORY, MODEL

STRENGTH_RANGE = 10.0  # ComfyUI's LoraLoader allows −100..100; past ±10 nothing useful is left
DEFAULT_LORA = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"


def check_strength(strength) -> str | None:
    """The error text for a bad strength, None when it is fine (VALIDATE_INPUTS and the run share it)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        return f"strength must be a finite number (1.0 = as trained, 0 = off), got {strength!r}."
    if abs(float(strength)) > STRENGTH_RANGE:
        return f"strength must lie in [-{STRENGTH_RANGE:g}, {STRENGTH_RANGE:g}], got {float(strength):g}."
    return None


class FastVideoLoRA:
    """A Wan 2.1 LoRA from ComfyUI's loras folder (lightx2v / CausVid step-distill, style LoRAs)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "lora_name": (comfy_api.folder_names("loras") or [DEFAULT_LORA],
                          {"tooltip": "a .safetensors LoRA in ComfyUI's models/loras folder"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -STRENGTH_RANGE, "max": STRENGTH_RANGE, "step": 0.05,
                                   "tooltip": "1.0 = as trained; several nodes in a row stack their LoRAs"}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, strength=1.0, **_):
        return check_strength(strength) or True

    def apply(self, model, lora_name, strength):
        from fastvideo_nodes.errors import FastVideoError
        problem = check_strength(strength)
        if problem:
            raise FastVideoError(problem)
        path = comfy_api.full_path("loras", lora_name)
        return (model.with_loras(list(model.loras) + [(path, float(strength))]),)
