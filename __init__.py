"""ComfyUI entry point for FastVideo Nodes.

ComfyUI imports this file by path and reads NODE_CLASS_MAPPINGS. The engine lives in
`fastvideo_nodes/` and imports without ComfyUI; the node classes live in `nodes/`.
"""
import os
import sys

# The engine is imported as the top-level package `fastvideo_nodes`, here and in worker processes.
# Appended, not prepended: ComfyUI's own top-level modules (its `nodes`) must keep precedence.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = None

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # nodes not importable: keep ComfyUI up and say why
    if "nodes" not in str(e) and "NODE_CLASS_MAPPINGS" not in str(e):
        print(f"[FastVideo Nodes] could not load nodes: {e}")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
