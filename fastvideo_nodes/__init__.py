"""FastVideo Nodes engine: Wan2.1 text-to-video, importable without ComfyUI."""
__version__ = "0.1.0"
