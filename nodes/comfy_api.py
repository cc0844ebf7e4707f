"""The few ComfyUI services the nodes use, looked up when ComfyUI is there.

Outside ComfyUI (tests, scripts) the node classes still work: model names are plain paths, there
is no progress bar, and nothing interrupts.
"""
from __future__ import annotations

import os


def folder_names(kind: str) -> list[str]:
    """File names in one of ComfyUI's model folders ("diffusion_models", "text_encoders", "vae")."""
    try:
        import folder_paths
        return list(folder_paths.get_filename_list(kind))
    except ImportError:
        return []


def diffusers_folders() -> list[str]:
    """Sub-folders of diffusion_models that look like diffusers Wan folders."""
    try:
        import folder_paths
        roots = folder_paths.get_folder_paths("diffusion_models")
    except ImportError:
        return []
    found = []
    for root in roots:
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.exists(os.path.join(root, name, "transformer", "config.json")):
                    found.append(name)
    return found


def full_path(kind: str, name: str) -> str:
    """ComfyUI model-folder name → path; outside ComfyUI the name is the path."""
    try:
        import folder_paths
    except ImportError:
        return name
    if os.path.isabs(name) and os.path.exists(name):
        return name
    for root in folder_paths.get_folder_paths(kind):  # diffusers folders are directories
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return folder_paths.get_full_path_or_raise(kind, name)


class Progress:
    """ComfyUI's progress bar (with previews) when available; each update is also a cancel point."""

    def __init__(self, total: int):
        try:
            import comfy.utils
            self.bar = comfy.utils.ProgressBar(total)
        except ImportError:
            self.bar = None

    def __call__(self, step: int, total: int, x0=None) -> None:
        if self.bar is None:
            return
        preview = None
        if x0 is not None:
            from PIL import Image

            from fastvideo_nodes.pipeline.preview import latent_to_rgb
            preview = ("JPEG", Image.fromarray(latent_to_rgb(x0).numpy()), 512)
        self.bar.update_absolute(step, total, preview)


def check_interrupted() -> bool:
    """Raises ComfyUI's interrupt exception when the user pressed cancel; False otherwise."""
    try:
        import comfy.model_management
    except ImportError:
        return False
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def free_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
