"""FastVideo LoRA: model in, model out, with one more LoRA on the model's list.

The node never touches the incoming model: it returns `model.with_loras(...)`, a generator that
shares the loaded weights and carries its own list, so a graph that samples the plain model and
the LoRA model side by side gets both right (the engine patches the shared DiT to the list of
whichever model samples). Chained nodes stack their LoRAs in order.

Wan2.2 A14B carries two experts in one MODEL, and its LoRAs ship as a HIGH and a LOW file: `expert`
says which list the LoRA joins. "auto" (the default) reads the file name (…HIGH…, …high_noise… →
the high-noise expert; …LOW…, …low_noise… → the low-noise one; neither → both), so a user who
chains the HIGH and the LOW file gets each on its own expert without setting anything.
"""
from __future__ import annotations

import logging
import math
import numbers

from . import comfy_api
from .model_nodes import CATEGORY, MODEL

logger = logging.getLogger(__name__)

EXPERTS = ["auto", "high", "low", "both"]
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
    """A Wan LoRA from ComfyUI's loras folder (lightx2v / CausVid step-distill, style LoRAs; Wan2.2
    Lightning's HIGH and LOW files, one per A14B expert)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "lora_name": (comfy_api.folder_names("loras") or [DEFAULT_LORA],
                          {"tooltip": "a .safetensors LoRA in ComfyUI's models/loras folder"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -STRENGTH_RANGE, "max": STRENGTH_RANGE, "step": 0.05,
                                   "tooltip": "1.0 = as trained; several nodes in a row stack their LoRAs"}),
        }, "optional": {
            "expert": (EXPERTS, {"default": "auto",
                                 "tooltip": "Wan2.2 A14B: which expert gets the LoRA; auto reads the file name "
                                            "(HIGH / high_noise → high, LOW / low_noise → low, else both). "
                                            "A one-DiT model takes auto, high or both"}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, strength=1.0, **_):
        return check_strength(strength) or True

    def apply(self, model, lora_name, strength, expert="auto"):
        from fastvideo_nodes.errors import FastVideoError
        from fastvideo_nodes.loading.lora import expert_of
        problem = check_strength(strength)
        if problem:
            raise FastVideoError(problem)
        if expert not in EXPERTS:
            raise FastVideoError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}.")
        path = comfy_api.full_path("loras", lora_name)
        lora = [(path, float(strength))]
        if model.files.low_noise_model is None:
            if expert == "low":
                raise FastVideoError(f"expert low: this model has one DiT (no low-noise expert); only Wan2.2 A14B "
                                     f"has two. Set expert to auto, high or both for {lora_name!r}.")
            return (model.with_loras(list(model.loras) + lora),)
        target = (expert_of(path) or "both") if expert == "auto" else expert
        if expert == "auto":
            logger.info("FastVideo LoRA %r: on the %s (expert auto, from the file name)", lora_name,
                        {"both": "both experts"}.get(target, f"{target}-noise expert"))
        high = list(model.loras) + (lora if target in ("high", "both") else [])
        low = list(model.loras_low) + (lora if target in ("low", "both") else [])
        return (model.with_loras(high, low),)
