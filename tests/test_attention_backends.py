"""Issue 17 on CPU: FLASH_ATTN_4 wiring (a fake `flash_attn.cute` injected), the backend listing with
install hints (CLI and node), the hybrid exact/8-bit schedule per step, and auto's record and log."""
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastvideo_nodes import attention as attn
from fastvideo_nodes.attention import (
    BACKENDS,
    attention,
    auto,
    backend_for_step,
    backend_module,
    backend_status,
    check_exact_steps,
    describe_backends,
    exact_step_indices,
    flash,
    flash4,
)
from fastvideo_nodes.errors import FastVideoError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="messages for a machine without CUDA")


def exact(q, k, v):
    return F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def qkv(s=64, h=2, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, s, h, d, generator=g).to(dtype) for _ in range(3))


@pytest.fixture
def fresh_imports():
    """Forget cached imports of FlashAttention so a test can put fake packages in sys.modules."""
    flash4._import.cache_clear()
    flash._impl.cache_clear()
    yield
    flash4._import.cache_clear()
    flash._impl.cache_clear()


@pytest.fixture
def fake_fa4(monkeypatch, fresh_imports):
    """flash-attn-4's layout: a `flash_attn` namespace (no flash_attn_func of its own, as when only FA4 is
    installed) and `flash_attn.cute.flash_attn_func` returning (out, lse). Records each call's inputs."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, causal, q.is_contiguous()))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), None

    parent = types.ModuleType("flash_attn")
    parent.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(flash4, "available", lambda: None)  # no Hopper here: the wiring is what is tested
    return calls


# ----------------------------------------------------------------------------- FLASH_ATTN_4

@no_cuda
def test_flash4_without_package_or_gpu_says_how_to_install(monkeypatch, fresh_imports):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert flash4.available() == (
        "FlashAttention 4 needs a CUDA GPU (Hopper or newer); flash-attn-4 is not installed: "
        f"{flash4.INSTALL}.")
    assert "flash-attn-4==4.0.0b36" in flash4.INSTALL and "nvidia-cutlass-dsl[cu13]==4.8.1" in flash4.INSTALL
    with pytest.raises(FastVideoError, match="attention backend FLASH_ATTN_4 cannot run here: .*pip install "
                                             "flash-attn-4"):
        attn.resolve_backend("flash_attn_4")


def test_flash4_broken_install_and_pre_hopper_gpu(monkeypatch, fresh_imports):
    broken = types.ModuleType("flash_attn.cute")  # imports, but without its function: a mismatched install
    parent = types.ModuleType("flash_attn")
    parent.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", broken)
    assert flash4.import_problem().startswith("flash-attn-4 is installed but `flash_attn.cute` does not import (")
    assert f"reinstall a matching pair: {flash4.INSTALL}" in flash4.import_problem()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash4, "_capability", lambda: (8, 9))
    assert flash4.available() == ("FlashAttention 4 runs on Hopper or newer (compute capability 9.0+); this GPU "
                                  "is 8.9. Use FLASH_ATTN (FlashAttention 2) or TORCH_SDPA.")
    monkeypatch.setattr(flash4, "_capability", lambda: (9, 0))
    assert "does not import" in flash4.available()


def test_flash_attn_no_longer_falls_back_to_fa4(fake_fa4):
    assert flash._impl() == (None, None)  # only FA4 is "installed": FLASH_ATTN has nothing, FLASH_ATTN_4 runs
    assert flash4._import()[0] is sys.modules["flash_attn.cute"].flash_attn_func
    assert "FLASH_ATTN_4" in BACKENDS and "FLASH_ATTN_4" in auto.CANDIDATES
    assert auto._PACKAGES["FLASH_ATTN_4"] == ("flash-attn-4", "nvidia-cutlass-dsl")
    assert "flash-attn-4" not in auto._PACKAGES["FLASH_ATTN"]


def test_flash4_dispatch_eager_compiled_and_fallback(fake_fa4):
    q, k, v = qkv()
    out = attention(q, k, v, backend="FLASH_ATTN_4")
    assert fake_fa4 == [((1, 64, 2, 128), (1, 64, 2, 128), torch.bfloat16, False, True)]  # [B, S, H, D] as is
    assert out.shape == q.shape and torch.allclose(out.float(), exact(q, k, v), atol=2e-2)
    # Cross-attention: queries and keys of different lengths.
    kc, vc = k[:, :10], v[:, :10]
    assert attention(q, kc, vc, backend="FLASH_ATTN_4").shape == q.shape and fake_fa4[-1][1] == (1, 10, 2, 128)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="FLASH_ATTN_4") * 2, backend=capture,
                             fullgraph=True)
    fake_fa4.clear()
    assert torch.allclose(compiled(q, k, v), out * 2)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("fastvideo.dense_attention") == 1, targets  # one opaque op, as other dense ones
    assert len(fake_fa4) == 1 and fake_fa4[0][4]  # the kernel got contiguous inputs

    fake_fa4.clear()
    q32, k32, v32 = (x.float() for x in (q, k, v))  # fp32 is outside FA4: exact SDPA, no crash
    assert torch.allclose(attention(q32, k32, v32, backend="FLASH_ATTN_4"), exact(q32, k32, v32), atol=1e-5)
    assert fake_fa4 == []


# ----------------------------------------------------------------------------- listing with install hints

def test_status_lists_every_backend_and_survives_a_broken_check(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(backend_module("KITCHEN_INT8"), "available", boom)
    status = backend_status()
    assert list(status) == list(BACKENDS) and status["TORCH_SDPA"] is None
    assert status["KITCHEN_INT8"] == "its availability check failed: RuntimeError('driver exploded')"
    lines = describe_backends()
    assert lines[0] == "TORCH_SDPA: usable"
    assert "SAGE_ATTN_THREE: not supported: SageAttention3 runs FP4 tensor cores and needs a Blackwell GPU" in lines


@no_cuda
def test_cli_backends_prints_reasons_and_hints(capsys):
    from fastvideo_nodes.cli import main
    assert main(["backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == describe_backends()
    assert any(line.startswith("FLASH_ATTN_4: not usable: FlashAttention 4 needs a CUDA GPU") for line in out)
    assert "TORCH_SDPA: usable" in out


def test_cli_checks_exact_attention_steps_before_loading(tmp_path, capsys):
    from fastvideo_nodes.cli import main
    code = main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "a fox",
                 "--output", str(tmp_path / "out.mp4"), "--exact-attention-steps", "-1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --exact-attention-steps must be a whole number of steps ≥ 0 "
                                               "(0 = 8-bit on every step), got -1.")


def test_attention_node_shows_status_and_schedule(tmp_path):
    import nodes as fv
    from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
    from fastvideo_nodes.pipeline.options import LoadOptions
    gen = VideoGenerator(ModelFiles(str(tmp_path / "m.safetensors")), LoadOptions(device="cpu"))
    node = fv.SetAttentionBackend()
    shown = node.apply(gen, "TORCH_SDPA", exact_steps=3)
    other, report = shown["result"]
    assert other._parts is gen._parts and other.exact_attention_steps == 3 and gen.exact_attention_steps == 0
    text = shown["ui"]["text"]
    assert text[0] == "requested: TORCH_SDPA"
    assert text[1] == ("hybrid: TORCH_SDPA on the first and last 3 steps when the backend is 8-bit "
                       "(SAGE_ATTN, INT8_ATTN, KITCHEN_INT8), that backend in between")
    assert text[2:] == describe_backends() and report == "\n".join(text)
    auto_text = node.apply(gen, "auto")["ui"]["text"]
    assert auto_text[0] == "requested: AUTO"
    assert auto_text[1].startswith(("attention auto (", "auto: decided at the first sampling step"))
    assert "exact_steps must be a whole number of steps ≥ 0" in fv.SetAttentionBackend.VALIDATE_INPUTS(
        backend="auto", exact_steps=-1)


# ----------------------------------------------------------------------------- hybrid schedule

def test_backend_for_step_and_validation():
    sched = [backend_for_step("INT8_ATTN", i, 6, 2) for i in range(6)]
    assert sched == ["TORCH_SDPA", "TORCH_SDPA", "INT8_ATTN", "INT8_ATTN", "TORCH_SDPA", "TORCH_SDPA"]
    assert exact_step_indices(6, 2) == [0, 1, 4, 5] and exact_step_indices(3, 2) == [0, 1, 2]
    assert [backend_for_step("SAGE_ATTN", i, 4, 0) for i in range(4)] == ["SAGE_ATTN"] * 4
    assert backend_for_step("FLASH_ATTN_4", 0, 6, 2) == "FLASH_ATTN_4"  # exact already: kept
    assert backend_for_step("KITCHEN_INT8", None, None, 2) == "KITCHEN_INT8"  # outside a sampling loop
    assert check_exact_steps(0) == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(FastVideoError, match=r"exact_attention_steps must be a whole number of steps ≥ 0 "
                                                 r"\(0 = 8-bit on every step\), got "):
            check_exact_steps(bad)


@pytest.fixture
def spied(monkeypatch):
    """INT8_ATTN made runnable on CPU (exact math inside), with every attention call's backend recorded."""
    from fastvideo_nodes.attention import int8, sdpa
    seen = []
    real = sdpa.attend
    monkeypatch.setattr(int8, "available", lambda: None)
    monkeypatch.setattr(int8, "attend", lambda q, k, v: (seen.append("INT8_ATTN"), real(q, k, v))[1])
    monkeypatch.setattr(sdpa, "attend", lambda q, k, v: (seen.append("TORCH_SDPA"), real(q, k, v))[1])
    return seen


def _per_step(seen, marks):
    """The backends of each step, from the call log and the index in it where each step ended."""
    bounds = [0] + marks
    return [sorted(set(seen[a:b])) for a, b in zip(bounds, bounds[1:])]


def test_text_cross_attention_is_exact_under_8bit_and_auto(spied):
    from fastvideo_nodes.attention import AttentionSpec
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 40, 2, 16, generator=g), torch.randn(1, 7, 2, 16, generator=g)
    for backend in ("INT8_ATTN", "AUTO", "TORCH_SDPA"):
        spied.clear()
        AttentionSpec(backend).cross_attention(q, kv, kv)
        assert spied == ["TORCH_SDPA"], backend
    spied.clear()
    AttentionSpec("INT8_ATTN").self_attention(q, q, q)
    assert spied == ["INT8_ATTN"]


@pytest.mark.parametrize("compiled", [False, True])
def test_hybrid_runs_exact_first_and_last_steps(spied, compiled):
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
    from fastvideo_nodes.testing.dit import TINY_DIT, random_dit
    dit = random_dit(TINY_DIT, seed=3)
    counter = None
    if compiled:  # the DiT's compiled blocks, under a backend that counts graphs instead of running inductor
        from torch._dynamo.testing import CompileCounter
        torch._dynamo.reset()
        counter = CompileCounter()
        for block in dit.blocks:
            block.compile(backend=counter, dynamic=False)
    s = SamplingSettings(height=64, width=64, num_frames=5, steps=6, guidance_scale=1.0)
    marks: list[int] = []
    g = torch.Generator().manual_seed(1)
    # 200 prompt rows: past TEXT_KEY_BUCKETS, so the text keys are not folded and cross-attention goes through a
    # backend (a folded context takes attention/counted.py, exact too; tests/test_counted_attention.py)
    ctx = torch.randn(1, 200, TINY_DIT.text_dim, generator=g)
    with torch.no_grad():
        denoise(dit, initial_noise(s), ctx, None, s, attention_backend="INT8_ATTN", exact_attention_steps=2,
                callback=lambda i, n, x0: marks.append(len(spied)))
    # text cross-attention is exact on every step (AttentionSpec.cross_attention)
    want = [["TORCH_SDPA"]] * 2 + [["INT8_ATTN", "TORCH_SDPA"]] * 2 + [["TORCH_SDPA"]] * 2
    assert _per_step(spied, marks) == want
    if compiled:
        assert counter.frame_count == 2  # one graph per backend name, not one per step
        spied.clear()
        marks.clear()
        with torch.no_grad():
            denoise(dit, initial_noise(s), ctx, None, s, attention_backend="INT8_ATTN", exact_attention_steps=2,
                    callback=lambda i, n, x0: marks.append(len(spied)))
        assert counter.frame_count == 2 and _per_step(spied, marks) == want
        torch._dynamo.reset()


def test_generation_record_carries_the_schedule(tmp_path):
    from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
    from fastvideo_nodes.pipeline.options import LoadOptions
    gen = VideoGenerator(ModelFiles(str(tmp_path / "m.safetensors")), LoadOptions(device="cpu"),
                         attention_backend="TORCH_SDPA", exact_attention_steps=1)
    assert gen.attention_used(4) == {"requested": "TORCH_SDPA", "hybrid": {
        "exact_steps": 1, "exact_backend": "TORCH_SDPA", "applies": False, "exact_at": []}}
    with pytest.raises(FastVideoError, match="exact_attention_steps must be a whole number"):
        VideoGenerator(ModelFiles(str(tmp_path / "m.safetensors")), LoadOptions(device="cpu"),
                       exact_attention_steps=-2)
    with pytest.raises(FastVideoError, match="exact_steps must be a whole number"):
        gen.with_attention_backend(None, exact_steps=-1)


def test_generation_record_for_an_8bit_backend(tmp_path, monkeypatch):
    from fastvideo_nodes.attention import int8
    from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
    from fastvideo_nodes.pipeline.options import LoadOptions
    monkeypatch.setattr(int8, "available", lambda: None)
    gen = VideoGenerator(ModelFiles(str(tmp_path / "m.safetensors")), LoadOptions(device="cpu"))
    hybrid = gen.with_attention_backend("INT8_ATTN", exact_steps=2).attention_used(10)["hybrid"]
    assert hybrid == {"exact_steps": 2, "exact_backend": "TORCH_SDPA", "applies": True, "exact_at": [0, 1, 8, 9]}


# ----------------------------------------------------------------------------- auto's record and log line

def _fake(rel_noise):
    def attend(q, k, v):
        ref = exact(q, k, v)
        noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
        return (ref + rel_noise * noise * (ref.norm() / noise.norm())).to(q.dtype)
    return types.SimpleNamespace(available=lambda: None, attend=attend)


def test_auto_record_has_guard_figures_and_logs_once_per_bucket(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FASTVIDEO_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "_memo", {})
    monkeypatch.setattr(auto, "_logged", set())
    modules = {"GOOD": _fake(0.001), "NOISY": _fake(0.10),
               "ABSENT": types.SimpleNamespace(available=lambda: "not installed (`pip install absent`)")}
    measure = lambda: auto.probe("cpu", torch.float32, 16, 2, 1024, modules=modules)
    with caplog.at_level(logging.INFO, logger=auto.__name__):
        rec = auto.decide("GPU|fp32|16|1024|k1", measure)
        auto.decide("GPU|fp32|16|1024|k1", measure)
        auto.decide("GPU|fp32|16|2048|k1", measure)  # another bucket: its own line
    assert rec["guard"] == {"min_cosine": 0.999, "max_rel_l2": 0.03}
    good, noisy = rec["backends"]["GOOD"], rec["backends"]["NOISY"]
    assert good["cosine"] >= 0.999 and good["rel_l2"] < 0.01 and "ms" in good and good["rejected"] is None
    assert noisy["cosine"] < 0.999 and 0.05 < noisy["rel_l2"] and "ms" not in noisy
    assert rec["backends"]["ABSENT"] == {"rejected": "not installed (`pip install absent`)"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention auto (")]
    assert len(lines) == 2
    assert lines[0].startswith("attention auto (torch.float32, hd 16, 1024 tokens): GOOD (fastest of 1 backends")
    assert f"GOOD ms {good['ms']} cosine {good['cosine']} rel_l2 {good['rel_l2']}" in lines[0]
    assert f"NOISY cosine {noisy['cosine']} rel_l2 {noisy['rel_l2']} rejected: cosine" in lines[0]
    assert "ABSENT rejected: not installed (`pip install absent`)" in lines[0]


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["FLASH_ATTN_4", "INT8_ATTN"])
def test_gpu_compiled_equals_eager(name):
    if backend_module(name).available():
        pytest.skip(backend_module(name).available())
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    eager = attention(q, k, v, backend=name)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend=name) * 1.0, fullgraph=True)(q, k, v)
    assert torch.allclose(compiled.float(), eager.float(), atol=1e-2)
    cos = F.cosine_similarity(eager.float().flatten(), exact(q, k, v).flatten(), dim=0).item()
    assert cos > 0.999


def test_a_failed_optional_import_keeps_no_caller_alive():
    """The cached answer to a failed import must not hold the exception: its traceback's frames chain up
    to the caller (auto's probe inside the DiT's forward), which kept a 14B model and its probe tensors
    allocated after the generator was dropped (17.5 GiB on an H200)."""
    import gc
    import weakref

    from fastvideo_nodes.attention import flash4

    class Model:  # stands for the DiT whose forward asks which backend to use
        pass

    def forward(model):
        return flash4.available()

    flash4._import.cache_clear()
    model = Model()
    alive = weakref.ref(model)
    why = forward(model)
    del model
    gc.collect()
    assert alive() is None
    assert why is None or "flash-attn-4" in why  # the message is still there without the exception
