"""The options objects (LoadOptions, SlidingTileOptions), the env module and the typed seams."""
import argparse
import dataclasses
import os
import re

import pytest
import torch

from fastvideo_nodes import env
from fastvideo_nodes.attention import AttentionSpec, as_options
from fastvideo_nodes.attention.sliding_tile import PRESETS, SlidingTileOptions
from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.models.seams import Attention, BlockCache, ParallelPlan
from fastvideo_nodes.pipeline.options import LoadOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- LoadOptions

def test_defaults_resolve_per_device():
    o = LoadOptions(device="cpu")
    assert (o.torch_device, o.dtype, o.weight_dtype, o.fp8_matmul) == (torch.device("cpu"), torch.float32, None, False)
    assert LoadOptions(device="cpu", precision="bf16").dtype == torch.bfloat16
    assert LoadOptions(device="cpu", precision=torch.float16).precision == "fp16"  # normalised once
    assert LoadOptions(precision="bfloat16").precision == "bf16"


def test_weight_storage_one_vocabulary_and_old_words():
    fp8, fast = LoadOptions(weight_storage="fp8"), LoadOptions(weight_storage="fp8_fast")
    assert (fp8.weight_dtype, fp8.fp8_matmul) == (torch.float8_e4m3fn, False)
    assert (fast.weight_dtype, fast.fp8_matmul) == (torch.float8_e4m3fn, True)
    for old, new in (("as stored", "as_stored"), ("fp8_e4m3fn", "fp8"), ("fp8_e4m3fn_fast", "fp8_fast")):
        assert LoadOptions(weight_storage=old) == LoadOptions(weight_storage=new)


@pytest.mark.parametrize("field,value,words", [
    ("weight_storage", "int8", ["weight_storage 'int8' is unknown", "as_stored, fp8, fp8_fast"]),
    ("precision", "fp64", ["precision 'fp64' is unknown", "bf16, fp16, fp32"]),
    ("device", "tpu", ["device 'tpu'", "cpu, cuda or cuda:N"]),
    ("text_encoder_device", "nowhere", ["text_encoder_device 'nowhere'", "cpu, cuda or cuda:N"]),
    ("gpu_memory_gb", -1.0, ["gpu_memory_gb must be a number of GB ≥ 0", "-1.0"]),
    ("compile", "yes", ["compile must be True or False", "'yes'"]),
])
def test_validation_names_the_field_and_valid_values(field, value, words):
    with pytest.raises(FastVideoError) as e:
        LoadOptions(**{field: value})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_frozen_hashable_and_normalised():
    o = LoadOptions(gpu_memory_gb=0)
    assert o.gpu_memory_gb is None  # 0 = fit automatically, as the node's 0.0
    assert LoadOptions(gpu_memory_gb=12).gpu_memory_gb == 12.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.compile = True
    assert len({LoadOptions(), LoadOptions(weight_storage="as stored")}) == 1  # a cache key


def test_keywords_turn_into_load_options_once():
    base = LoadOptions(precision="fp16", compile=True)
    assert LoadOptions.from_keywords(base, weight_storage="fp8") == LoadOptions(precision="fp16", compile=True,
                                                                                 weight_storage="fp8")
    # the older keywords
    assert LoadOptions.from_keywords(dtype="fp32", weight_dtype=torch.float8_e4m3fn).weight_storage == "fp8"
    assert LoadOptions.from_keywords(fp8_matmul=True).weight_storage == "fp8_fast"
    with pytest.raises(FastVideoError, match="unknown load option.*bogus"):
        LoadOptions.from_keywords(bogus=1)
    with pytest.raises(FastVideoError, match="weight_dtype .* not supported"):
        LoadOptions.from_keywords(weight_dtype=torch.float16)


def _cli_options(*flags):
    from fastvideo_nodes.cli import _add_generation_args, load_options
    p = argparse.ArgumentParser()
    _add_generation_args(p)
    return load_options(p.parse_args(["--model", "m", "--prompt", "p", "--device", "cpu", *flags]))


def test_cli_api_and_node_build_the_same_options(tmp_path):
    import sys
    sys.path.insert(0, ROOT)
    from nodes.model_nodes import LoadFastVideoModel

    want = LoadOptions(device="cpu", precision="fp16", weight_storage="fp8_fast", compile=True, gpu_memory_gb=8,
                       text_encoder_device="cpu")
    flags = ["--precision", "fp16", "--compile", "--gpu-memory-gb", "8", "--text-encoder-device", "cpu"]
    assert _cli_options(*flags, "--weight-storage", "fp8_fast") == want
    assert _cli_options(*flags, "--fp8-fast") == want  # the alias
    assert _cli_options("--fp8").weight_storage == "fp8"
    assert _cli_options("--dtype", "bf16").precision == "bf16"  # the older flag name
    assert _cli_options().weight_storage == "as_stored"
    node = LoadFastVideoModel.options("fp16", "fp8_e4m3fn_fast", compile=True, gpu_memory_gb=8.0,
                                      text_encoder_device="cpu")
    assert node == want.replace(device=None)  # the node leaves the device to the machine

    from fastvideo_nodes.pipeline.generator import VideoGenerator
    model = tmp_path / "dit.safetensors"
    model.write_bytes(b"")  # from_pretrained only resolves paths; components load on first use
    gen = VideoGenerator.from_pretrained(str(model), options=want.replace(compile=False), compile=True)
    assert gen.options == want and gen.device == torch.device("cpu") and gen.dtype == torch.float16


# -- SlidingTileOptions

def test_sliding_tile_options_validated():
    o = SlidingTileOptions(window=[3, 3, 7])
    assert o.window == (3, 3, 7) and o.tile == PRESETS["wan-480p"].tile and o.dense_steps == 0
    for bad in (dict(window=(3, 3)), dict(tile=(4, 0, 8)), dict(window=(1.5, 3, 3)), dict(dense_steps=-1)):
        with pytest.raises(FastVideoError, match="sliding-tile"):
            SlidingTileOptions(**bad)


def test_attention_spec_carries_typed_options():
    assert AttentionSpec().options is None and AttentionSpec(options={}).options is None
    assert AttentionSpec(options=dict(window=(5, 5, 5))).options == SlidingTileOptions(window=(5, 5, 5))
    with pytest.raises(FastVideoError, match="sliding-tile window"):
        as_options(dict(window=(0, 1, 1)))
    with pytest.raises(FastVideoError, match="must be SlidingTileOptions"):
        as_options([3, 3, 5])


def test_with_attention_backend_takes_sliding_tile_options(tmp_path):
    from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
    gen = VideoGenerator(ModelFiles(str(tmp_path / "m.safetensors")), LoadOptions(device="cpu"))
    sta = gen.with_attention_backend("SLIDING_TILE_ATTN", SlidingTileOptions(dense_steps=2))
    assert sta.attention_options.dense_steps == 2 and gen.attention_options is None
    with pytest.raises(FastVideoError, match="must be SlidingTileOptions"):
        gen.with_attention_backend("SLIDING_TILE_ATTN", {"dense_steps": 2})


# -- env

def _sources():
    for top in ("fastvideo_nodes", "nodes"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                if n.endswith(".py"):
                    yield os.path.join(d, n)


def test_every_fastvideo_variable_is_declared_and_read_only_in_env():
    for path in _sources():
        text = open(path, encoding="utf-8").read()
        for name in set(re.findall(r"FASTVIDEO_[A-Z_]+", text)) - {"FASTVIDEO_MODEL"}:  # a ComfyUI type name
            assert name in env.VARIABLES, f"{path} mentions {name}, which env.py does not declare"
        # A module that names a FASTVIDEO_* variable reads it through env.get, never os.environ itself
        # (the name may sit in a constant, as ENV_VAR does, so the whole file is checked).
        if "FASTVIDEO_" in text and not path.endswith(os.path.join("fastvideo_nodes", "env.py")):
            assert not re.search(r"os\.environ|getenv\(", text), f"{path} reads the environment itself"


def test_env_get_and_readme_table(monkeypatch):
    monkeypatch.delenv("FASTVIDEO_SDPA_KERNEL", raising=False)
    assert env.get("FASTVIDEO_SDPA_KERNEL") == ""
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "torch_sdpa")
    from fastvideo_nodes.attention import resolve_backend
    assert resolve_backend(None) == "TORCH_SDPA"  # read through env.get at call time
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert env.markdown_table() in readme, "README's table is stale: paste `python -m fastvideo_nodes.env`"
    for v in env.VARIABLES.values():
        assert v.kind in ("path", "choice", "seconds") and v.meaning and (v.kind != "choice" or v.choices)


# -- seams

def test_implementations_satisfy_the_seams(tmp_path):
    import torch.distributed as dist

    from fastvideo_nodes.parallel.ulysses import UlyssesAttention, UlyssesPlan
    from fastvideo_nodes.pipeline.teacache import TeaCache, coefficients_for

    spec = AttentionSpec(backend="TORCH_SDPA")
    assert isinstance(spec, Attention)
    assert isinstance(TeaCache(0.1, 4, coefficients_for("1.3B", "default")), BlockCache)
    assert not isinstance(object(), ParallelPlan) and not isinstance(object(), Attention)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plan = UlyssesPlan()
        assert isinstance(plan, ParallelPlan)
        tokens, cos, sin = torch.randn(1, 6, 8), torch.randn(6, 2), torch.randn(6, 2)
        local, rope, attn = plan.enter(tokens, (cos, sin), spec)
        assert isinstance(attn, UlyssesAttention) and isinstance(attn, Attention)
        q = torch.randn(1, 6, 2, 4)
        assert torch.allclose(attn.self_attention(q, q, q), spec.self_attention(q, q, q))
        assert torch.equal(plan.exit(local), tokens)
    finally:
        dist.destroy_process_group()
