"""ComfyUI node classes: thin faces over the fastvideo_nodes engine (no math here)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
