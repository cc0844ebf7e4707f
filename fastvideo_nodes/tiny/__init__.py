"""Tiny random Wan2.1 models written in the real file layouts.

Used by the tests (parity with diffusers/transformers on identical weights) and by the demo.
Nothing here downloads anything; the sentencepiece tokenizer is trained on the spot.
"""
import os


def cache_dir() -> str:
    """Where tiny artefacts (tokenizer, demo model) are cached between runs."""
    base = os.environ.get("FASTVIDEO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvideo_nodes")
    os.makedirs(base, exist_ok=True)
    return base
