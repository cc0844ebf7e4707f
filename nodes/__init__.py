"""ComfyUI node classes: thin faces over the fastvideo_nodes engine (no math here)."""
from .model_nodes import FastVideoParallelWorkers, LoadFastVideoModel, SetAttentionBackend
from .sampling_nodes import DecodeVAE, EncodePrompt, FastVideoSampler

NODE_CLASS_MAPPINGS = {
    "LoadFastVideoModel": LoadFastVideoModel,
    "SetAttentionBackend": SetAttentionBackend,
    "EncodePrompt": EncodePrompt,
    "FastVideoSampler": FastVideoSampler,
    "DecodeVAE": DecodeVAE,
    "FastVideoParallelWorkers": FastVideoParallelWorkers,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadFastVideoModel": "Load FastVideo Model (Wan2.1)",
    "SetAttentionBackend": "FastVideo Attention Backend",
    "EncodePrompt": "FastVideo Encode Prompt",
    "FastVideoSampler": "FastVideo Sampler",
    "DecodeVAE": "FastVideo Decode VAE",
    "FastVideoParallelWorkers": "FastVideo Parallel Workers",
}
