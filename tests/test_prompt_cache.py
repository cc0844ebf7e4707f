"""PromptCache: encode once per (encoder, prompt), LRU bound, entries gone with their encoder."""
from __future__ import annotations

import gc
import threading

import pytest
import torch

from fastvideo_nodes.pipeline.prompt_cache import PromptCache


class CountingEncoder:
    """Stands in for TextEncoder: embeddings derived from the text, and a log of what was encoded."""

    def __init__(self, dim: int = 8, offset: float = 0.0):
        self.dim, self.offset = dim, offset
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        rows = [torch.full((4, self.dim), float(sum(map(ord, p))) + self.offset) for p in prompts]
        return torch.stack(rows).to(torch.bfloat16 if self.offset else torch.float32)


def test_second_call_does_not_encode_again():
    cache, enc = PromptCache(), CountingEncoder()
    first = cache.encode(enc, ["a cat", "negative"], enc.encode)
    again = cache.encode(enc, ["a cat", "negative"], enc.encode)
    assert enc.calls == [["a cat", "negative"]]
    assert (cache.hits, cache.misses) == (2, 2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, enc.encode(["a cat", "negative"]), rtol=0, atol=0)
    assert first.dtype == torch.float32 and first.device.type == "cpu" and first.shape == (2, 4, 8)


def test_only_missing_prompts_are_encoded_in_one_batch_and_order_is_kept():
    cache, enc = PromptCache(), CountingEncoder()
    cache.encode(enc, ["negative"], enc.encode)
    out = cache.encode(enc, ["b", "negative", "a", "b"], enc.encode)
    assert enc.calls == [["negative"], ["b", "a"]]
    torch.testing.assert_close(out, enc.encode(["b", "negative", "a", "b"]), rtol=0, atol=0)


def test_the_default_negative_prompt_is_encoded_once_per_encoder():
    cache, one, two = PromptCache(), CountingEncoder(), CountingEncoder(offset=1.0)
    for seed_prompt in ["p1", "p2", "p3"]:
        for enc in (one, two):
            cache.encode(enc, [seed_prompt], enc.encode)
            cache.encode(enc, ["default negative"], enc.encode)
    assert sum(c == ["default negative"] for c in one.calls) == 1
    assert sum(c == ["default negative"] for c in two.calls) == 1
    # Same text, different encoder: different embeddings, float32 whatever the encoder returned.
    a = cache.encode(one, ["p1"], one.encode)
    b = cache.encode(two, ["p1"], two.encode)
    assert not torch.equal(a, b) and b.dtype == torch.float32


def test_results_are_fresh_tensors():
    cache, enc = PromptCache(), CountingEncoder()
    cache.encode(enc, ["x"], enc.encode).zero_()
    assert cache.encode(enc, ["x"], enc.encode).abs().sum() > 0


def test_lru_bound():
    cache, enc = PromptCache(max_entries=3), CountingEncoder()
    for p in ["a", "b", "c"]:
        cache.encode(enc, [p], enc.encode)
    cache.encode(enc, ["a"], enc.encode)  # a is now the most recent; b the least
    cache.encode(enc, ["d"], enc.encode)
    assert len(cache) == 3
    enc.calls.clear()
    cache.encode(enc, ["a", "c", "d"], enc.encode)
    assert enc.calls == []
    cache.encode(enc, ["b"], enc.encode)
    assert enc.calls == [["b"]]
    with pytest.raises(ValueError):
        PromptCache(max_entries=0)


def test_a_dropped_encoder_takes_its_entries_and_is_not_kept_alive():
    cache, keep, drop = PromptCache(), CountingEncoder(), CountingEncoder()
    cache.encode(keep, ["a"], keep.encode)
    cache.encode(drop, ["a", "b"], drop.encode)
    assert len(cache) == 3
    del drop  # the cache holds no strong reference, so the encoder dies here
    gc.collect()
    assert len(cache) == 1
    keep.calls.clear()
    cache.encode(keep, ["a"], keep.encode)
    assert keep.calls == []


def test_forget():
    cache, enc = PromptCache(), CountingEncoder()
    cache.encode(enc, ["a", "b"], enc.encode)
    cache.forget(enc)
    assert len(cache) == 0
    cache.encode(enc, ["a"], enc.encode)
    assert enc.calls[-1] == ["a"]


def test_threads_share_one_encoding_per_prompt():
    cache, enc = PromptCache(max_entries=64), CountingEncoder()
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(20):
                prompts = [f"prompt {j % 5}", "negative"]
                results.append(cache.encode(enc, prompts, enc.encode))
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    encoded = [p for call in enc.calls for p in call]
    assert sorted(encoded) == sorted({f"prompt {j}" for j in range(5)} | {"negative"})
    assert cache.misses == 6 and cache.hits == 8 * 20 * 2 - 6
    assert len(results) == 160 and all(r.shape == (2, 4, 8) for r in results)


def counted(fn, calls: list):
    def wrapper(prompts: list[str]) -> torch.Tensor:
        calls.append(prompts)
        return fn(prompts)
    return wrapper


def test_with_the_tiny_text_encoder(tiny_model_set):
    from fastvideo_nodes.loading.text_encoder import load_text_encoder
    from fastvideo_nodes.models.text_encoder import DEFAULT_NEGATIVE_PROMPT

    te = load_text_encoder(tiny_model_set["comfy_fp32"]["text_encoder"])
    calls: list[list[str]] = []
    encode = counted(te.encode, calls)

    cache = PromptCache()
    for prompt in ["a red fox in the snow", "a boat on a calm lake", "a red fox in the snow"]:
        out = cache.encode(te, [prompt, DEFAULT_NEGATIVE_PROMPT], encode)
        torch.testing.assert_close(out, te.encode([prompt, DEFAULT_NEGATIVE_PROMPT]), rtol=0, atol=0)
    assert calls == [["a red fox in the snow", DEFAULT_NEGATIVE_PROMPT], ["a boat on a calm lake"]]
    assert out.shape == (2, 512, te.dim)
    del te, encode
    gc.collect()
    assert len(cache) == 0
