"""ComfyUI entry point for FastVideo Nodes.

ComfyUI imports this file by path and reads NODE_CLASS_MAPPINGS. The engine lives in
`fastvideo_nodes/` and imports without ComfyUI; the node classes live in `nodes/`.
"""
import logging
import os
import sys

# The engine is imported as the top-level package `fastvideo_nodes`, here and in worker processes.
# Appended, not prepended: ComfyUI's own top-level modules (its `nodes`) must keep precedence.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except Exception:  # keep ComfyUI up, and say exactly why the pack has no nodes
    logging.getLogger("fastvideo_nodes").exception(
        "[FastVideo Nodes] the nodes could not be imported, so the pack offers none; the cause is below. "
        "A missing package is installed with `pip install -r %s`.", os.path.join(_here, "requirements.txt"))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
