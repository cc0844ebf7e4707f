"""Tiny random Wan2.1 models written in the real file layouts.

Used by the tests (parity with diffusers/transformers on identical weights) and by the CLI's
`demo` command. Production code (loading, models, pipeline, nodes) never imports this package.
Nothing here downloads anything; the sentencepiece tokenizer is trained on the spot.
"""
from ..env import cache_dir

__all__ = ["cache_dir"]
