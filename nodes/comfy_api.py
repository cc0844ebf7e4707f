"""The few ComfyUI services the nodes use, looked up when ComfyUI is there.

Outside ComfyUI (tests, scripts) the node classes still work: model names are plain paths, there
is no progress bar, and nothing interrupts.
"""
from __future__ import annotations

import os


def folder_names(kind: str) -> list[str]:
    """File names in one of ComfyUI's model folders ("diffusion_models", "text_encoders", "vae", "loras",
    "clip_vision")."""
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


# The node input that names a file of each ComfyUI model folder, for error messages.
INPUT_NAMES = {"diffusion_models": "model", "text_encoders": "text_encoder", "vae": "vae", "loras": "lora_name",
               "clip_vision": "clip_vision"}


def full_path(kind: str, name: str) -> str:
    """ComfyUI model-folder name → path; outside ComfyUI (no folder_paths) the name is the path.

    Inside ComfyUI a name must stay inside one of the kind's model folders: an absolute path or a
    `../` that leaves them is refused, so a workflow cannot make the server open any file it likes.
    The check is on the name (symlinks a user placed inside a model folder still work)."""
    try:
        import folder_paths
    except ImportError:
        return name
    from fastvideo_nodes.errors import ModelFileError

    what = INPUT_NAMES.get(kind, kind)
    roots = [os.path.abspath(r) for r in folder_paths.get_folder_paths(kind)]
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise ModelFileError(f"{what}: {name!r} must be a name inside ComfyUI's {kind} folder "
                             f"({', '.join(roots) or 'none configured'}), not an absolute path.")
    inside = False
    for root in roots:
        path = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            continue
        inside = True
        if os.path.exists(path):
            return path
    if not inside:
        raise ModelFileError(f"{what}: {name!r} leaves ComfyUI's {kind} folder; pick a file from the list "
                             f"(files in {', '.join(roots) or 'no folder'}).")
    raise ModelFileError(f"{what}: {name!r} is not in ComfyUI's {kind} folder ({', '.join(roots)}); put the file "
                         "there and refresh the node, or pick one from the list.")


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


def vram_mode() -> str | None:
    """ComfyUI's memory mode from its flags: "novram", "lowvram", "highvram" (also --gpu-only),
    "normal"; None outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    from comfy.cli_args import args
    if getattr(args, "gpu_only", False):
        return "highvram"
    state = getattr(mm.vram_state, "name", "NORMAL_VRAM")
    return {"NO_VRAM": "novram", "LOW_VRAM": "lowvram", "HIGH_VRAM": "highvram"}.get(state, "normal")


def memory_host(options):
    """(options, host) for a model loaded inside ComfyUI, following its memory flags; outside
    ComfyUI (options, None). The user's gpu_memory_gb and text_encoder_device still win:
    novram: text encoder on the CPU, the DiT streamed with the least GPU memory;
    lowvram / normal: plan for the memory ComfyUI reports free;
    highvram / --gpu-only: plan for the whole card (everything resident when it fits)."""
    mode = vram_mode()
    if mode is None:
        return options, None
    import comfy.model_management as mm

    from .comfy_memory import ComfyHost
    device = mm.get_torch_device()
    if device.type != "cuda":
        return options, None
    if mode == "novram":
        if options.text_encoder_device is None:
            options = options.replace(text_encoder_device="cpu")
        return options, ComfyHost(budget=0, minimal=True)
    if mode == "highvram":
        return options, ComfyHost(budget=int(mm.get_total_memory(device)))
    return options, ComfyHost(budget=int(mm.get_free_memory(device)))


def free_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
