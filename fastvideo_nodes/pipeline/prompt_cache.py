"""Prompt embeddings cached by (encoder, prompt text).

Encoding with UMT5-XXL is the costliest step of a short call when the encoder is not resident
(seconds on the GPU after moving 10.6 GiB in, far more on the CPU), and most calls repeat a prompt:
the default negative prompt every time, the positive one while a user tunes seeds or steps. So
each (encoder, prompt) is encoded once and kept, most recently used first, up to `max_entries`.

What is kept: float32 [1, 512, dim] on the CPU, exactly what `encode()` returns. A hit is then
bit-identical to a fresh encoding, the GPU holds nothing for the cache, and the sampler's cast to
the compute dtype on its device (8 MiB per prompt at dim 4096) costs nothing next to a step.
32 entries at dim 4096 are 256 MiB of host memory.

Encoders are keyed weakly: the cache never keeps an encoder (or its weights) alive, and when an
encoder is garbage-collected, or its owner calls `forget()`, its entries go with it.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], torch.Tensor]  # prompts -> [B, L, dim]


class PromptCache:
    """hits: prompts served from the cache; misses: prompts encoded."""

    def __init__(self, max_entries: int = 32):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 (got {max_entries})")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._tokens: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._next_token = 0
        self._dead: list[int] = []  # tokens of collected encoders, purged on the next access
        # Held while encoding too: one encoder is one model on one device, and a prompt asked for
        # by two threads at once is then encoded once.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def _token(self, encoder: object) -> int:
        token = self._tokens.get(encoder)
        if token is None:
            token = self._tokens[encoder] = self._next_token
            self._next_token += 1
            # Ids are never reused, so a new encoder at a dead one's address starts empty.
            weakref.finalize(encoder, _forget_token, weakref.ref(self), token)
        return token

    def encode(self, encoder: object, prompts: Sequence[str], encode: Encode) -> torch.Tensor:
        """[B, L, dim] for `prompts`, calling `encode` (one batch) only for prompts not cached for
        this `encoder`. The result is a fresh tensor the caller may modify."""
        with self._lock:
            self._purge()
            token = self._token(encoder)
            missing = list(dict.fromkeys(p for p in prompts if (token, p) not in self._entries))
            self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
            self.misses += len(missing)
            if missing:
                log.debug("encoding %d prompt(s), %d cached", len(missing), len(prompts) - len(missing))
                fresh = encode(missing)
                for p, row in zip(missing, fresh.detach().float().cpu().split(1)):
                    self._entries[(token, p)] = row.clone()
            rows = []
            for p in prompts:
                self._entries.move_to_end((token, p))
                rows.append(self._entries[(token, p)])
            out = torch.cat(rows).clone()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return out

    def forget(self, encoder: object) -> None:
        """Drop every entry of `encoder` (its owner is about to drop it)."""
        with self._lock:
            token = self._tokens.pop(encoder, None)
            if token is not None:
                self._drop(token)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _drop(self, token: int) -> None:
        for key in [k for k in self._entries if k[0] == token]:
            del self._entries[key]

    def _purge(self) -> None:
        while self._dead:
            self._drop(self._dead.pop())


def _forget_token(cache_ref: weakref.ref, token: int) -> None:
    # Runs inside garbage collection, possibly in the middle of another cache call: only note it.
    cache = cache_ref()
    if cache is not None:
        cache._dead.append(token)
