"""Encode → sample → decode, with native ComfyUI types at every edge."""
from __future__ import annotations

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.pipeline.inputs import check_prompt, parse_sigmas
from fastvideo_nodes.pipeline.sampler import SamplingSettings
from fastvideo_nodes.pipeline.schedulers import SCHEDULERS, SPACINGS

from . import comfy_api
from .model_nodes import CATEGORY, MODEL


class EncodePrompt:
    """Prompt and negative prompt → two native CONDITIONING outputs (UMT5, 512 tokens)."""

    @classmethod
    def INPUT_TYPES(cls):
        from fastvideo_nodes.models.text_encoder import DEFAULT_NEGATIVE_PROMPT
        return {"required": {
            "model": (MODEL,),
            "prompt": ("STRING", {"multiline": True, "default": ""}),
            "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, prompt="", negative_prompt="", **_):
        try:
            check_prompt(prompt, "prompt")
            check_prompt(negative_prompt, "negative_prompt")
        except FastVideoError as e:
            return str(e)
        return True

    def encode(self, model, prompt, negative_prompt, **_):
        # **_: workflows saved with the former offload_text_encoder input (the memory plan decides now).
        check_prompt(prompt, "prompt")  # also when the text came through a link, unseen by VALIDATE_INPUTS
        check_prompt(negative_prompt, "negative_prompt")
        pos, neg = model.encode_prompts([prompt, negative_prompt]).split(1)
        return ([[pos, {}]], [[neg, {}]])


def _embedding(conditioning, name: str):
    """The text embedding [1, L, dim] of a CONDITIONING (ours or ComfyUI's CLIPTextEncode)."""
    try:
        return conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise FastVideoError(f"{name}: expected a CONDITIONING from FastVideoEncodePrompt or CLIPTextEncode.") from None


class FastVideoSampler:
    """Wan flow-matching sampler with CFG gate and TeaCache → native LATENT (raw VAE space; 48
    channels for Wan2.2 TI2V-5B). Few-step LoRAs: cfg 1, euler or lcm, spacing simple (or an
    explicit sigmas list). One image input (native IMAGE; the first frame of a batch) for both image
    models: Wan2.1 I2V's start image (required) or Wan2.2 TI2V-5B's first frame (optional)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "positive": ("CONDITIONING",),
            "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
            "num_frames": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.1}),
            "scheduler": (list(SCHEDULERS), {"default": "unipc"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "cfg_gate": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "fraction of steps that run the unconditional pass (1 = off)"}),
            "teacache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                             "tooltip": "0 = off; 0.08 for 1.3B, 0.2 for 14B"}),
        }, "optional": {
            "negative": ("CONDITIONING",),
            "spacing": (list(SPACINGS), {"default": "default", "tooltip":
                        "simple: ComfyUI's spacing, what 4-step distill LoRAs expect (euler and lcm only)"}),
            "sigmas": ("STRING", {"default": "", "tooltip": "e.g. 1, 0.9375, 0.8333, 0.625: used as given (no "
                                  "shift), replaces steps; empty = use steps and shift"}),
            "image": ("IMAGE", {"tooltip": "the start image, the first one of a batch: required by a Wan2.1 I2V "
                                "model, the optional first frame of a Wan2.2 TI2V-5B (another aspect ratio: its "
                                "middle cut to the video's, then resized to width × height)"}),
            "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "Wan2.1 image-to-video: native CLIPVisionEncode "
                                   "of the start image, instead of the loader's clip_vision file"}),
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.999, "step": 0.005, "tooltip":
                         "Wan2.2 A14B: the low-noise expert takes over below timestep boundary·1000; 0 = the "
                         "model's (0.875 for T2V)"}),
            "cfg_low": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip":
                        "Wan2.2 A14B: the low-noise expert's cfg (cfg is the high-noise one's); 0 = same as cfg"}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=832, height=480, num_frames=81, steps=50, cfg=5.0, shift=3.0, scheduler="unipc",
                        seed=0, cfg_gate=1.0, teacache_threshold=0.0, spacing="default", sigmas="", boundary=0.0,
                        cfg_low=0.0, **_):
        try:
            _settings(width, height, num_frames, steps, cfg, shift, scheduler, seed, cfg_gate,
                      teacache_threshold, spacing, sigmas, boundary, cfg_low).validate()
        except FastVideoError as e:
            return str(e)
        return True

    def sample(self, model, positive, width, height, num_frames, steps, cfg, shift, scheduler, seed, cfg_gate,
               teacache_threshold, negative=None, spacing="default", sigmas="", image=None,
               clip_vision_output=None, boundary=0.0, cfg_low=0.0):
        settings = _settings(width, height, num_frames, steps, cfg, shift, scheduler, seed, cfg_gate,
                             teacache_threshold, spacing, sigmas, boundary, cfg_low)
        neg = _embedding(negative, "negative") if negative is not None else None
        encoded = None
        # An I2V model without an image goes on too: the engine says what is missing (as for a mismatch).
        cfg = model.dit_config()
        if image is not None or cfg.image_dim is not None or cfg.in_channels == 36:  # 36: Wan2.2 I2V-A14B
            first = image[:1] if getattr(image, "ndim", 0) == 4 else image
            encoded = model.encode_image(first, settings, image_embeds=_clip_tokens(clip_vision_output))
        latents = model.sample(_embedding(positive, "positive"), neg, settings,
                               callback=comfy_api.Progress(settings.num_steps),
                               cancel=comfy_api.check_interrupted, image_condition=encoded)
        return ({"samples": latents},)


def _clip_tokens(output):
    """The penultimate hidden states [B, 257, 1280] of a native CLIP_VISION_OUTPUT (None → None)."""
    if output is None:
        return None
    try:
        return output["penultimate_hidden_states"]
    except (TypeError, KeyError, AttributeError):
        raise FastVideoError("clip_vision_output: expected the output of ComfyUI's CLIPVisionEncode (it carries "
                             "penultimate_hidden_states).") from None


def _settings(width, height, num_frames, steps, cfg, shift, scheduler, seed, cfg_gate,
              teacache_threshold, spacing="default", sigmas="", boundary=0.0, cfg_low=0.0) -> SamplingSettings:
    """The node's inputs under the engine's names; the one place both VALIDATE_INPUTS and sample build them.
    boundary and cfg_low 0 (widgets have no None): the model's boundary, the low expert at cfg."""
    return SamplingSettings(height=height, width=width, num_frames=num_frames, steps=steps, guidance_scale=cfg,
                            shift=shift, scheduler=scheduler, seed=seed, cfg_gate=cfg_gate,
                            teacache_threshold=teacache_threshold, spacing=spacing, sigmas=parse_sigmas(sigmas),
                            boundary=boundary or None, guidance_scale_low=cfg_low or None)


class DecodeVAE:
    """LATENT (ours or a native KSampler's Wan latent) → IMAGE frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "samples": ("LATENT",),
        }, "optional": {
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 512, "step": 8,
                                  "tooltip": "0 = whole frame; else spatial tiles of this many latent pixels"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, model, samples, tile_size=0):
        z = samples.get("samples") if isinstance(samples, dict) else None
        if not hasattr(z, "ndim"):
            raise FastVideoError("samples: expected a LATENT (a dict with a 'samples' tensor) from FastVideoSampler "
                                 "or KSampler.")
        if z.ndim != 5 or z.shape[1] not in (16, 48):
            raise FastVideoError(f"samples: expected a Wan video latent [B,16,T,H,W] (Wan 2.1) or [B,48,T,H,W] "
                                 f"(Wan 2.2), got shape {tuple(z.shape)}.")
        return (model.decode(z[:1], tile=tile_size or None),)
