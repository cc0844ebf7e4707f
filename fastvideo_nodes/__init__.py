"""FastVideo Nodes engine: Wan2.1 text-to-video, importable without ComfyUI.

    from fastvideo_nodes import VideoGenerator
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import fastvideo_nodes.models...` stays light.
    if name == "VideoGenerator":
        from .pipeline.generator import VideoGenerator
        return VideoGenerator
    raise AttributeError(name)
