"""Loading the model, choosing the attention backend, and the parallel launcher."""
from __future__ import annotations

import weakref

from fastvideo_nodes.attention import BACKENDS, check_exact_steps, report_lines, resolve_backend
from fastvideo_nodes.attention.sliding_tile import SlidingTileOptions
from fastvideo_nodes.attention.video_sparse import DEFAULT_SPARSITY, VideoSparseOptions, check_sparsity
from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.pipeline.options import PRECISIONS, WEIGHT_STORAGE, LoadOptions

from . import comfy_api

CATEGORY = "FastVideo"
MODEL = "FASTVIDEO_MODEL"

class LoadFastVideoModel:
    """Wan 2.1 text-to-video or image-to-video files → a FastVideo model, loaded now (placed by the
    memory plan) and, on CUDA, warmed up by load() for the model's own size (Wan2.1 480×832×81,
    Wan2.2 TI2V-5B 704×1280×121: the attention decision and the kernel builds a first run would
    pay; another size shares most kernels). Image-to-video also
    needs the CLIP vision file (clip_vision), unless a diffusers I2V folder brings its own
    image_encoder/. Wan2.2 A14B: model = the high-noise expert and low_noise_model = the low-noise
    one (same folder).

    Nothing here holds the weights: the returned generator does (ComfyUI keeps it as this node's
    output), and generators of the same files and options share one loaded set. When this node
    loads other files, it first closes the model it returned before, so the two never sit in
    memory side by side."""

    _previous = None  # weakref to the generator this node returned last

    @classmethod
    def INPUT_TYPES(cls):
        models = comfy_api.diffusers_folders() + comfy_api.folder_names("diffusion_models")
        return {"required": {
            "model": (models or ["wan2.1_t2v_1.3B_fp16.safetensors"],
                      {"tooltip": "Wan2.1 T2V or I2V DiT file, or a diffusers folder (FastWan folders too)"}),
            "text_encoder": (["(from diffusers folder)"] + comfy_api.folder_names("text_encoders"),),
            "vae": (["(from diffusers folder)"] + comfy_api.folder_names("vae"),),
            "precision": (list(PRECISIONS), {"default": "bf16"}),
            "weight_storage": (list(WEIGHT_STORAGE), {"default": "as_stored", "tooltip":
                               "fp8: half the memory, dequantised at use. fp8_fast: also multiplies in fp8 "
                               "on the tensor cores (RTX 40xx/H100 and newer; faster, lossy)"}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the DiT blocks (first run warms up)"}),
            "gpu_memory_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                        "tooltip": "GPU memory for the DiT; 0 = fit automatically"}),
            "text_encoder_device": (["gpu", "cpu"], {"default": "gpu", "tooltip": "cpu: encode prompts on the CPU"}),
            "clip_vision": (["(none)"] + comfy_api.folder_names("clip_vision"), {"tooltip":
                            "image-to-video: the CLIP vision file (clip_vision_h.safetensors); a diffusers I2V "
                            "folder brings its own"}),
            "low_noise_model": (["(none)"] + comfy_api.folder_names("diffusion_models"), {"tooltip":
                                "Wan2.2 A14B: the low-noise expert (model is then the high-noise one); a "
                                "diffusers A14B folder brings its own transformer_2/"}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, weight_storage):
        # Naming weight_storage here makes ComfyUI leave its list check to us, so that workflows saved
        # with the older words ("as stored", "fp8_e4m3fn", "fp8_e4m3fn_fast") still run.
        try:
            LoadOptions(weight_storage=weight_storage)
        except FastVideoError as e:
            return str(e)
        return True

    @staticmethod
    def options(precision, weight_storage, compile=False, gpu_memory_gb=0.0, text_encoder_device="gpu"):
        """The node's widgets → LoadOptions (the same object the API and the CLI build)."""
        return LoadOptions(precision=precision, weight_storage=weight_storage, compile=bool(compile),
                           gpu_memory_gb=float(gpu_memory_gb),
                           text_encoder_device="cpu" if text_encoder_device == "cpu" else None)

    def load(self, model, text_encoder, vae, precision, weight_storage, compile=False, gpu_memory_gb=0.0,
             text_encoder_device="gpu", clip_vision="(none)", low_noise_model="(none)"):
        from fastvideo_nodes.pipeline.generator import VideoGenerator

        path = comfy_api.full_path("diffusion_models", model)
        te = None if text_encoder.startswith("(") else comfy_api.full_path("text_encoders", text_encoder)
        va = None if vae.startswith("(") else comfy_api.full_path("vae", vae)
        image_encoder = None if clip_vision.startswith("(") else comfy_api.full_path("clip_vision", clip_vision)
        low = None if low_noise_model.startswith("(") else comfy_api.full_path("diffusion_models", low_noise_model)
        options, host = comfy_api.memory_host(
            self.options(precision, weight_storage, compile, gpu_memory_gb, text_encoder_device))
        gen = VideoGenerator.from_pretrained(path, text_encoder=te, vae=va, image_encoder=image_encoder,
                                             low_noise_model=low, options=options)
        previous = self._previous() if self._previous is not None else None
        if previous is not None and previous._parts is not gen._parts:
            previous.close()  # its weights leave before the new ones come in
            comfy_api.free_memory()
        if host is not None:
            gen.set_memory_host(host)
        gen.load()
        self._previous = weakref.ref(gen)
        return (gen,)


class SetAttentionBackend:
    """Same weights, another attention kernel (or FASTVIDEO_ATTENTION_BACKEND / auto; auto is
    VIDEO_SPARSE_ATTN for FastWan models, and only they can run it). Its text (ui and the
    attention_report output) shows every backend's status (usable, or why not and how to install
    it), auto's decision and the hybrid schedule."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "backend": (["auto"] + list(BACKENDS), {"default": "auto"}),
        }, "optional": {
            "sta_window": ("STRING", {"default": "3,3,5", "tooltip": "SLIDING_TILE_ATTN: window in tiles (t,h,w)"}),
            "sta_dense_steps": ("INT", {"default": 0, "min": 0, "max": 1000}),
            "exact_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                    "tooltip": "8-bit backends (SAGE_ATTN, INT8_ATTN, KITCHEN_INT8): exact "
                                               "attention on the first and last N steps; 0 = 8-bit throughout"}),
            "sparsity": ("FLOAT", {"default": DEFAULT_SPARSITY, "min": 0.0, "max": 0.99, "step": 0.05,
                                   "tooltip": "VIDEO_SPARSE_ATTN (FastWan models): fraction of key tiles skipped"}),
        }}

    RETURN_TYPES = (MODEL, "STRING")
    RETURN_NAMES = ("model", "attention_report")  # the same text, for a Preview Any node
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, backend, sta_window="3,3,5", exact_steps=0, sparsity=DEFAULT_SPARSITY, **_):
        try:
            resolve_backend(backend)
            _parse_window(sta_window)
            check_exact_steps(exact_steps, "exact_steps")
            check_sparsity(sparsity)
        except FastVideoError as e:
            return str(e)
        return True

    def apply(self, model, backend, sta_window="3,3,5", sta_dense_steps=0, exact_steps=0, sparsity=DEFAULT_SPARSITY):
        options: SlidingTileOptions | VideoSparseOptions | None = None
        if backend == "SLIDING_TILE_ATTN":
            options = SlidingTileOptions(window=_parse_window(sta_window), dense_steps=int(sta_dense_steps))
        elif backend == "VIDEO_SPARSE_ATTN":
            if not model.dit_config().gate_compress:
                from fastvideo_nodes.models.wan_dit import NEEDS_FASTWAN
                raise FastVideoError(NEEDS_FASTWAN)
            options = VideoSparseOptions(sparsity=sparsity)
        name = None if backend == "auto" else backend
        gen = model.with_attention_backend(name, options, exact_steps=exact_steps)
        lines = report_lines(name, exact_steps)
        return {"ui": {"text": lines}, "result": (gen, "\n".join(lines))}


def _parse_window(text: str) -> tuple[int, int, int]:
    try:
        w = tuple(int(x) for x in text.split(","))
        if len(w) != 3 or min(w) < 1:
            raise ValueError
        return w
    except ValueError:
        raise FastVideoError(f"sta_window must be three positive integers 't,h,w' (e.g. 3,3,5), "
                             f"got {text!r}.") from None


class FastVideoParallelWorkers:
    """Run sampling on N GPUs (sequence parallel) through persistent worker processes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "num_gpus": ("INT", {"default": 2, "min": 1, "max": 8}),
        }, "optional": {
            "gpu_ids": ("STRING", {"default": "",
                                   "tooltip": "comma-separated CUDA device ids; empty = the first num_gpus"}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "launch"
    CATEGORY = CATEGORY

    def launch(self, model, num_gpus, gpu_ids=""):
        import torch

        from fastvideo_nodes.pipeline.inputs import parse_gpu_ids
        ids = parse_gpu_ids(gpu_ids)
        visible = torch.cuda.device_count()
        if model.device.type == "cuda":
            wanted = ids or list(range(num_gpus))
            if len(wanted) != num_gpus:
                raise FastVideoError(f"gpu_ids names {len(wanted)} GPUs but num_gpus is {num_gpus}.")
            if visible < num_gpus or any(i >= visible for i in wanted):
                raise FastVideoError(f"num_gpus {num_gpus} (gpu_ids {wanted}) asks for GPUs that are not here: "
                                     f"{visible} visible (ids 0..{visible - 1}).")
        heads = model.dit_config().num_heads
        if heads % num_gpus:
            ok = [d for d in range(1, 9) if heads % d == 0]
            raise FastVideoError(f"num_gpus {num_gpus} does not divide the model's {heads} attention heads; "
                                 f"use one of {ok}.")
        return (model.with_parallel(num_gpus, ids),)
