"""The fused ops: each torch path against a float64 reference, the dispatch choice (CPU / CUDA /
compiling / layout) on a CPU by replacing its seams, and each Triton path against the torch path
on a GPU (skipped without CUDA and Triton)."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.ops import fused
from fastvideo_nodes.ops import triton_kernels as tk
from fastvideo_nodes.ops.fused import (
    channels_last,
    layer_norm_affine,
    layer_norm_modulate,
    linear_gelu,
    residual_layer_norm,
    rms_norm_channels,
    rms_norm_rope,
)
from fastvideo_nodes.ops.linear import Linear, fp8_linear, quantize_fp8


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


# ----------------------------------------------------------------------------- float64 references

def ref_rms_norm_rope(x, weight, angles, eps):
    """RMS over all heads, weight, then (x[2i], x[2i+1]) rotated by angles [S, D/2]."""
    b, s, h, d = x.shape
    flat = x.double().reshape(b, s, h * d)
    y = (flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).reshape(b, s, h, d)
    c, sn = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    out = torch.empty_like(y)
    out[..., 0::2] = y[..., 0::2] * c - y[..., 1::2] * sn
    out[..., 1::2] = y[..., 0::2] * sn + y[..., 1::2] * c
    return out


def ref_layer_norm(x, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)


def ref_rms_norm_channels(x, gamma, silu):
    x = x.double()
    y = x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12) * math.sqrt(x.shape[1]) * gamma.double()
    return y * torch.sigmoid(y) if silu else y


def rope_inputs(heads=2, d=16, s=10, dtype=torch.float32, device="cpu"):
    g = gen(1, device)
    x = (torch.randn(2, s, heads, d, generator=g, device=device) * 3).to(dtype)
    w = torch.rand(heads * d, generator=g, device=device) + 0.5
    angles = torch.rand(s, d // 2, generator=g, device=device, dtype=torch.float64) * 2 * math.pi
    return x, w, angles.cos().float(), angles.sin().float(), angles


# ----------------------------------------------------------------------------- torch paths (CPU)

@pytest.mark.parametrize("compiling", [False, True])  # eager: complex multiply; compiled: real pairs
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_rope_torch_path(monkeypatch, compiling, dtype, tol):
    monkeypatch.setattr(fused, "_compiling", lambda: compiling)
    x, w, cos, sin, angles = rope_inputs(dtype=dtype)
    got = rms_norm_rope(x, w, cos, sin, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel(got, ref_rms_norm_rope(x, w, angles, 1e-6)) < tol


@pytest.mark.parametrize("out_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_layer_norm_modulate_and_affine_torch_path(out_dtype, tol):
    g = gen(2)
    x = torch.randn(2, 7, 48, generator=g) * 4 + 1
    shift, scale = torch.randn(2, 1, 48, generator=g), torch.randn(1, 1, 48, generator=g)
    got = layer_norm_modulate(x, shift, scale, 1e-6, out_dtype)
    assert got.dtype == out_dtype
    assert rel(got, ref_layer_norm(x, 1e-6) * (1 + scale.double()) + shift.double()) < tol
    weight, bias = torch.randn(48, generator=g), torch.randn(48, generator=g)
    got = layer_norm_affine(x.bfloat16(), weight, bias, 1e-6, out_dtype)  # bf16 in, float32 math
    assert got.dtype == out_dtype
    assert rel(got, ref_layer_norm(x.bfloat16(), 1e-6) * weight.double() + bias.double()) < tol


@pytest.mark.parametrize("gated", [False, True])
def test_residual_layer_norm_torch_path(gated):
    g = gen(3)
    x = torch.randn(2, 7, 48, generator=g) * 4 + 1
    y = torch.randn(2, 7, 48, generator=g).bfloat16()
    gate = torch.randn(2, 1, 48, generator=g) if gated else None
    a, b = torch.randn(1, 1, 48, generator=g), torch.randn(48, generator=g)
    new_x, h = residual_layer_norm(x, y, gate, a, b, 1e-6, torch.bfloat16)
    want_x = x.double() + y.double() * (1.0 if gate is None else gate.double())
    assert new_x.dtype == torch.float32 and rel(new_x, want_x) < 1e-6
    assert h.dtype == torch.bfloat16 and rel(h, ref_layer_norm(want_x, 1e-6) * a.double() + b.double()) < 1e-2


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,fmt", [((1, 12, 3, 5, 7), torch.channels_last_3d), ((3, 12, 5, 7), torch.channels_last),
                                       ((1, 12, 3, 5, 7), torch.contiguous_format)])
def test_rms_norm_channels_torch_path(silu, shape, fmt):
    g = gen(3)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    gamma = torch.randn(shape[1], *(1,) * (len(shape) - 2), generator=g)
    got = rms_norm_channels(x, gamma, silu=silu)
    assert rel(got, ref_rms_norm_channels(x, gamma, silu)) < 1e-5
    assert got.is_contiguous(memory_format=fmt)  # the layout goes through


def test_linear_gelu_torch_path():
    g = gen(4)
    layer = Linear(24, 40)
    with torch.no_grad():
        layer.weight.normal_(generator=g)
        layer.bias.normal_(generator=g)
    x = torch.randn(2, 5, 24, generator=g)
    want = F.gelu(x.double() @ layer.weight.double().t() + layer.bias.double(), approximate="tanh")
    assert rel(linear_gelu(layer, x), want) < 1e-5


def test_fp8_linear_cpu_emulation_close_to_float64():
    g = gen(5)
    w, scale = quantize_fp8(torch.randn(32, 64, generator=g) * 0.02, torch.float8_e4m3fn)
    x, bias = torch.randn(3, 9, 64, generator=g).bfloat16(), torch.randn(32, generator=g).bfloat16()
    want = x.double() @ (w.double() * scale.double()).t() + bias.double()  # exact product of the stored weight
    got = fp8_linear(x, w, scale, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 9, 32)
    assert rel(got, want) < 0.08  # e4m3 activations (3 mantissa bits), then bf16 output


def test_channels_last_predicate():
    x = torch.zeros(1, 4, 2, 3, 5)
    assert channels_last(x.contiguous(memory_format=torch.channels_last_3d)) and not channels_last(x)
    assert channels_last(torch.zeros(2, 4, 3, 5).contiguous(memory_format=torch.channels_last))
    assert not channels_last(torch.zeros(1, 1, 2, 3, 5)) and not channels_last(torch.zeros(4, 5))


# ----------------------------------------------------------------------------- dispatch choice (CPU)

@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors take the CUDA branches; every kernel is replaced by a recorder of its arguments."""
    calls = []
    monkeypatch.setattr(fused, "_cuda", lambda x: True)
    monkeypatch.setattr(fused, "_compiling", lambda: False)
    monkeypatch.setattr(tk, "triton_available", lambda: True)
    for name in ("rms_norm_rope", "rms_norm_rope_op", "layer_norm_affine", "layer_norm_affine_op",
                 "residual_layer_norm", "residual_layer_norm_op", "rms_norm_silu"):
        def record(x, *args, _name=name, **kw):
            calls.append((_name, args, kw))
            return (x, x) if _name.startswith("residual") else x
        monkeypatch.setattr(tk, name, record)
    return calls


def test_rms_norm_rope_dispatch(fake_gpu, monkeypatch):
    x, w, cos, sin, _ = rope_inputs(dtype=torch.bfloat16)
    assert fused.rms_norm_rope_impl(x) == "triton"
    rms_norm_rope(x, w, cos, sin, 1e-6)
    assert [c[0] for c in fake_gpu] == ["rms_norm_rope"] and fake_gpu[0][1][-1] == 1e-6
    assert fused.rms_norm_rope_impl(x.float()) == "torch"  # the kernels take half precision only
    assert fused.rms_norm_rope_impl(x.transpose(1, 2)) == "torch"  # and contiguous rows
    monkeypatch.setattr(fused, "_compiling", lambda: True)
    assert fused.rms_norm_rope_impl(x) == "custom_op"  # opaque to Inductor, even non-contiguous
    assert fused.rms_norm_rope_impl(x.transpose(1, 2)) == "custom_op"
    rms_norm_rope(x, w, cos, sin, 1e-6)
    assert fake_gpu[-1][0] == "rms_norm_rope_op"
    monkeypatch.setattr(fused, "_compiling", lambda: False)
    monkeypatch.setattr(tk, "triton_available", lambda: False)
    assert fused.rms_norm_rope_impl(x) == "torch"


def test_layer_norm_dispatch(fake_gpu, monkeypatch):
    x = torch.randn(2, 5, 16)
    shift, scale = torch.randn(2, 1, 16), torch.randn(1, 1, 16)
    assert fused.layer_norm_impl(x) == "triton"
    layer_norm_modulate(x, shift, scale, 1e-6, torch.bfloat16)
    name, (a, b, eps, dtype), _ = fake_gpu[-1]
    assert name == "layer_norm_affine" and torch.equal(a, 1 + scale) and b is shift and dtype == torch.bfloat16
    weight, bias = torch.randn(16), torch.randn(16)
    layer_norm_affine(x, weight, bias, 1e-5, torch.float16)
    assert fake_gpu[-1][1] == (weight, bias, 1e-5, torch.float16)
    assert fused.layer_norm_impl(x.transpose(0, 1)) == "torch"
    assert fused.layer_norm_impl(x[None]) == "torch"  # [B,S,C] only
    assert fused.layer_norm_impl(x, torch.randn(2, 5, 16)) == "torch"  # per-token params: Wan 2.2's modulation
    y, gate = torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    residual_layer_norm(x, y, gate, weight, bias, 1e-6, torch.bfloat16)
    name, args, _ = fake_gpu[-1]
    assert name == "residual_layer_norm" and args[1] is gate and args[2] is weight
    monkeypatch.setattr(fused, "_compiling", lambda: True)  # compiled blocks: the opaque ops, one pass each
    assert fused.layer_norm_impl(x) == "custom_op"
    layer_norm_modulate(x, shift, scale, 1e-6, torch.bfloat16)
    assert fake_gpu[-1][0] == "layer_norm_affine_op"
    residual_layer_norm(x, y, None, weight, bias, 1e-6, torch.bfloat16)
    assert fake_gpu[-1][0] == "residual_layer_norm_op" and fake_gpu[-1][1][1] is None
    assert fused.layer_norm_impl(x, torch.randn(2, 5, 16)) == "torch"
    monkeypatch.setattr(fused, "_compiling", lambda: False)
    monkeypatch.setattr(tk, "triton_available", lambda: False)
    assert fused.layer_norm_impl(x) == "torch"


def test_rms_norm_channels_dispatch(fake_gpu, monkeypatch):
    x = torch.randn(1, 9, 2, 3, 4)
    gamma = torch.ones(9, 1, 1, 1)
    assert fused.rms_norm_channels_impl(x) == "torch"  # the kernel reads channels-last only
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    assert fused.rms_norm_channels_impl(xl) == "triton"
    rms_norm_channels(xl, gamma, silu=True)
    assert fake_gpu[-1] == ("rms_norm_silu", (gamma, 3.0), {"silu": True})
    monkeypatch.setattr(fused, "_compiling", lambda: True)
    assert fused.rms_norm_channels_impl(xl) == "torch"


def test_linear_gelu_dispatch(monkeypatch):
    """The epilogue path for a plain weight in the input's dtype on CUDA only (on CPU
    torch._addmm_activation applies the erf GELU, not Wan's tanh one); the layer's own forward
    (fp8, scaled weights) otherwise."""
    layer = Linear(8, 12)
    x = torch.randn(3, 4, 8, generator=gen(6))
    assert fused.linear_gelu_impl(layer, x) == "torch"
    monkeypatch.setattr(fused, "_cuda", lambda x: True)
    assert fused.linear_gelu_impl(layer, x) == "cublaslt"
    assert fused.linear_gelu_impl(layer, x.double()) == "torch"
    layer.scale_weight = torch.ones(12, 1)
    assert fused.linear_gelu_impl(layer, x) == "torch"
    no_bias = Linear(8, 12, bias=False)
    assert fused.linear_gelu_impl(no_bias, x) == "torch"


def test_real_cpu_takes_torch_everywhere():
    x, *_ = rope_inputs(dtype=torch.bfloat16)
    assert fused.rms_norm_rope_impl(x) == "torch"
    assert fused.layer_norm_impl(torch.zeros(1, 2, 8)) == "torch"
    assert fused.rms_norm_channels_impl(torch.zeros(1, 4, 1, 2, 2).contiguous(memory_format=torch.channels_last_3d)) \
        == "torch"


def test_launch_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tk, "triton_available", lambda: False)
    tk._jit.cache_clear()
    try:
        x, w, cos, sin, _ = rope_inputs(dtype=torch.bfloat16)
        with pytest.raises(FastVideoError, match="need Triton and a CUDA GPU"):
            tk.rms_norm_rope(x, w, cos, sin, 1e-6)
        with pytest.raises(FastVideoError, match="install Triton"):
            tk.layer_norm_affine(torch.zeros(1, 2, 8), torch.ones(8), torch.zeros(8), 1e-6, torch.float32)
        with pytest.raises(FastVideoError, match="Triton"):
            tk.rms_norm_silu(torch.zeros(1, 4, 1, 2, 2), torch.ones(4), 2.0)
    finally:
        tk._jit.cache_clear()


def test_models_import_without_building_kernels():
    """Importing the models (and asking whether Triton is there) defines no jit kernel."""
    code = ("import sys, fastvideo_nodes.models.wan_dit, fastvideo_nodes.models.wan_vae; "
            "from fastvideo_nodes.ops.triton_kernels import triton_available; triton_available(); "
            "print('fastvideo_nodes.ops.triton_jit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]


# ----------------------------------------------------------------------------- Triton paths

INTERPRETED = r"""
import json, os
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels run on CPU tensors
import torch
from fastvideo_nodes.ops import fused, triton_kernels as tk

def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

g = torch.Generator().manual_seed(0)
x = (torch.randn(2, 6, 3, 8, generator=g) * 3).bfloat16()
w, ang = torch.rand(24, generator=g) + 0.5, torch.rand(6, 4, generator=g) * 6.28
r = torch.randn(2, 5, 40, generator=g) * 3 + 1
shift, scale = torch.randn(2, 1, 40, generator=g), torch.randn(1, 1, 40, generator=g)
wb, bb = torch.randn(40, generator=g), torch.randn(40, generator=g)
ry = torch.randn(2, 5, 40, generator=g).bfloat16()
v = torch.randn(1, 12, 2, 3, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
gamma = torch.randn(12, 1, 1, 1, generator=g)
ops = {
    "rms_norm_rope": lambda: fused.rms_norm_rope(x, w, ang.cos(), ang.sin(), 1e-6),
    "layer_norm_modulate": lambda: fused.layer_norm_modulate(r, shift, scale, 1e-6, torch.float32),
    "layer_norm_affine": lambda: fused.layer_norm_affine(r, wb, bb, 1e-6, torch.float32),
    "rms_norm_channels": lambda: fused.rms_norm_channels(v, gamma, silu=True),
    "residual_layer_norm": lambda: torch.cat(fused.residual_layer_norm(r, ry, shift, scale, wb, 1e-6, torch.float32),
                                             -1),
}
want = {k: f() for k, f in ops.items()}
tk.triton_available = lambda: True
fused._cuda = lambda t: True  # CPU tensors now take the CUDA branch, i.e. the Triton kernels
impls = [fused.rms_norm_rope_impl(x), fused.layer_norm_impl(r), fused.rms_norm_channels_impl(v)]
got = {k: f() for k, f in ops.items()}
print(json.dumps({"impls": impls, "err": {k: rel(got[k], want[k]) for k in ops},
                  "layout": got["rms_norm_channels"].is_contiguous(memory_format=torch.channels_last_3d)}))
"""


def test_triton_kernels_in_interpreter():
    """Triton's interpreter runs the real kernels on CPU tensors: each public op on its Triton path
    against its torch path, so the kernels are checked where there is no GPU (skipped without Triton)."""
    pytest.importorskip("triton")
    import json
    out = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["impls"] == ["triton"] * 3 and res["layout"]
    assert res["err"]["rms_norm_rope"] < 0.02  # bf16: the torch path rounds once more
    for name in ("layer_norm_modulate", "layer_norm_affine", "rms_norm_channels", "residual_layer_norm"):
        assert res["err"][name] < 1e-5, name


# ----------------------------------------------------------------------------- Triton paths (GPU)

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and tk.triton_available()),
                                  reason="the Triton kernels need CUDA and Triton")


def on_torch_path(fn, *args, **kw):
    """fn run with every op on its torch math, on the same (CUDA) tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_cuda", lambda x: False)
        return fn(*args, **kw)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("heads", [2, 12])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_rope_triton_equals_torch(heads, dtype):
    x, w, cos, sin, angles = rope_inputs(heads=heads, d=128, s=60, dtype=dtype, device="cuda")
    assert fused.rms_norm_rope_impl(x) == "triton"
    got = rms_norm_rope(x, w, cos, sin, 1e-6)
    want = on_torch_path(rms_norm_rope, x, w, cos, sin, 1e-6)
    assert got.dtype == dtype and got.is_contiguous()
    assert rel(got, want) < 0.02  # the torch path rounds once more, after the norm
    assert rel(got, ref_rms_norm_rope(x, w, angles, 1e-6)) < 0.01  # float32 inside, one rounding at the end


@pytest.mark.gpu
@needs_triton
def test_rms_norm_rope_custom_op_compiles_to_the_kernel():
    """Inside torch.compile the op is the opaque custom op: a full graph, the kernel's own result."""
    x, w, cos, sin, _ = rope_inputs(heads=12, d=128, s=60, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(tk.rms_norm_rope_op, (x, w, cos, sin, 1e-6))
    eager = rms_norm_rope(x, w, cos, sin, 1e-6)
    compiled = torch.compile(lambda t: rms_norm_rope(t, w, cos, sin, 1e-6), fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, heads-major memory
    assert torch.equal(compiled(strided), eager)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("out_dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_layer_norm_triton_equals_torch(out_dtype, tol, per_batch):
    g = gen(7, "cuda")
    c = 1536
    x = torch.randn(2, 60, c, generator=g, device="cuda") * 3 + 1
    shift = torch.randn(2 if per_batch else 1, 1, c, generator=g, device="cuda")
    scale = torch.randn(1, 1, c, generator=g, device="cuda")
    assert fused.layer_norm_impl(x) == "triton"
    got = layer_norm_modulate(x, shift, scale, 1e-6, out_dtype)
    assert got.dtype == out_dtype
    assert rel(got, on_torch_path(layer_norm_modulate, x, shift, scale, 1e-6, out_dtype)) < tol
    weight, bias = torch.randn(c, generator=g, device="cuda"), torch.randn(c, generator=g, device="cuda")
    got = layer_norm_affine(x, weight, bias, 1e-6, out_dtype)
    assert rel(got, on_torch_path(layer_norm_affine, x, weight, bias, 1e-6, out_dtype)) < tol


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("c", [1536, 5120])
@pytest.mark.parametrize("gated", [False, True])
def test_residual_layer_norm_triton_equals_torch(c, gated):
    g = gen(11, "cuda")
    x = torch.randn(2, 60, c, generator=g, device="cuda") * 3 + 1
    y = torch.randn(2, 60, c, generator=g, device="cuda").bfloat16()
    gate = torch.randn(2, 1, c, generator=g, device="cuda") if gated else None
    a, b = torch.randn(2, 1, c, generator=g, device="cuda"), torch.randn(c, generator=g, device="cuda")
    assert fused.layer_norm_impl(x, gate, a, b) == "triton"
    new_x, h = residual_layer_norm(x, y, gate, a, b, 1e-6, torch.bfloat16)
    want_x, want_h = on_torch_path(residual_layer_norm, x, y, gate, a, b, 1e-6, torch.bfloat16)
    assert rel(new_x, want_x) < 1e-6 and rel(h, want_h) < 1e-2


@pytest.mark.gpu
@needs_triton
def test_layer_norm_custom_ops_compile_to_the_kernels():
    """Inside torch.compile the LayerNorms are the opaque ops: a full graph, the kernels' own results."""
    g = gen(12, "cuda")
    x = torch.randn(1, 60, 5120, generator=g, device="cuda")
    y = torch.randn(1, 60, 5120, generator=g, device="cuda").bfloat16()
    gate, a, b = (torch.randn(1, 1, 5120, generator=g, device="cuda") for _ in range(3))
    torch.library.opcheck(tk.residual_layer_norm_op, (x, y, gate, a, b, 1e-6, torch.bfloat16))
    torch.library.opcheck(tk.layer_norm_affine_op, (x, a, b, 1e-6, torch.bfloat16))

    def block_tail(x, y):
        x, h = residual_layer_norm(x, y, gate, a, b, 1e-6, torch.bfloat16)
        return x, h, layer_norm_modulate(x, a, b, 1e-6, torch.bfloat16)
    eager = block_tail(x, y)
    compiled = torch.compile(block_tail, fullgraph=True, dynamic=False)(x, y)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("channels", [96, 192, 384])
@pytest.mark.parametrize("silu", [False, True])
def test_rms_norm_channels_triton_equals_torch(channels, silu):
    g = gen(8, "cuda")
    gamma = torch.randn(channels, 1, 1, 1, generator=g, device="cuda")
    x = torch.randn(1, channels, 3, 17, 23, generator=g, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    assert fused.rms_norm_channels_impl(x) == "triton"
    assert fused.rms_norm_channels_impl(x.contiguous()) == "torch"
    got = rms_norm_channels(x, gamma, silu=silu)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel(got, on_torch_path(rms_norm_channels, x, gamma, silu=silu)) < 1e-4
    xb = x.bfloat16()
    want = on_torch_path(rms_norm_channels, xb.float(), gamma, silu=silu)
    assert rel(rms_norm_channels(xb, gamma.bfloat16(), silu=silu), want) < 0.02
    images = x[:, :, 0]  # [N,C,H,W] channels-last, as the VAE's attention block norms
    assert fused.rms_norm_channels_impl(images) == "triton"
    g2 = gamma[..., 0]
    assert rel(rms_norm_channels(images, g2, silu=silu), on_torch_path(rms_norm_channels, images, g2, silu=silu)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt epilogue runs on CUDA")
def test_linear_gelu_epilogue_equals_torch():
    layer = Linear(256, 512).cuda().bfloat16()
    x = torch.randn(2, 70, 256, generator=gen(9, "cuda"), device="cuda").bfloat16()
    assert fused.linear_gelu_impl(layer, x) == "cublaslt"
    assert rel(linear_gelu(layer, x), on_torch_path(linear_gelu, layer, x)) < 0.02
