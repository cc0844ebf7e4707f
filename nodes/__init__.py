"""ComfyUI node classes: thin faces over the fastvideo_nodes engine (no math here).

Registry keys are global across every installed pack, so each one starts with FastVideo (or
LoadFastVideo); the class names stay short.
"""
from .lora_nodes import FastVideoLoRA
from .model_nodes import FastVideoParallelWorkers, LoadFastVideoModel, SetAttentionBackend
from .sampling_nodes import DecodeVAE, EncodePrompt, FastVideoSampler

NODE_CLASS_MAPPINGS = {
    "LoadFastVideoModel": LoadFastVideoModel,
    "FastVideoSetAttentionBackend": SetAttentionBackend,
    "FastVideoEncodePrompt": EncodePrompt,
    "FastVideoSampler": FastVideoSampler,
    "FastVideoDecodeVAE": DecodeVAE,
    "FastVideoParallelWorkers": FastVideoParallelWorkers,
    "FastVideoLoRA": FastVideoLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadFastVideoModel": "Load FastVideo Model (Wan2.1)",
    "FastVideoSetAttentionBackend": "FastVideo Attention Backend",
    "FastVideoEncodePrompt": "FastVideo Encode Prompt",
    "FastVideoSampler": "FastVideo Sampler",
    "FastVideoDecodeVAE": "FastVideo Decode VAE",
    "FastVideoParallelWorkers": "FastVideo Parallel Workers",
    "FastVideoLoRA": "FastVideo LoRA",
}
