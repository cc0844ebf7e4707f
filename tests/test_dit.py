"""The Wan DiT equals diffusers' WanTransformer3DModel on identical weights, in every file layout."""
import os

import pytest
import torch
from safetensors.torch import save_file

from fastvideo_nodes.errors import ModelFileError
from fastvideo_nodes.loading.dit import config_from_shapes, load_dit
from fastvideo_nodes.ops.linear import Linear
from fastvideo_nodes.testing.dit import (
    TINY_DIT,
    diffusers_to_original,
    diffusers_transformer,
    quantize_fp8,
    save_original,
)

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ref():
    return diffusers_transformer(TINY_DIT, seed=1)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    t = torch.tensor([999.0, 412.0])
    ctx = torch.randn(2, 512, TINY_DIT.text_dim, generator=g)
    ctx[:, 20:] = 0  # real prompts are zero past their length
    return x, t, ctx


@pytest.fixture(scope="module")
def expected(ref, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("dit")
    ref.save_pretrained(d / "folder" / "transformer", max_shard_size="300KB")  # sharded, with index json
    sd = ref.state_dict()
    orig = diffusers_to_original(sd)
    return {
        "folder": str(d / "folder"),
        "orig_fp32": save_original(orig, str(d / "wan_fp32.safetensors"), dtype=None),
        "orig_prefixed": save_original(orig, str(d / "wan_prefixed.safetensors"), dtype=None,
                                       prefix="model.diffusion_model."),
        "diffusers_single": save_original(sd, str(d / "diffusers_single.safetensors"), dtype=None),
        "orig_fp16": save_original(orig, str(d / "wan_fp16.safetensors"), dtype=torch.float16),
        "orig_bf16": save_original(orig, str(d / "wan_bf16.safetensors"), dtype=torch.bfloat16),
        "fp8_e4m3": save_original(quantize_fp8(orig, torch.float8_e4m3fn), str(d / "wan_e4m3.safetensors"), None),
        "fp8_e5m2": save_original(quantize_fp8(orig, torch.float8_e5m2), str(d / "wan_e5m2.safetensors"), None),
        "fp8_scaled": save_original(quantize_fp8(orig, scaled=True), str(d / "wan_scaled.safetensors"), None),
        "dir": d,
    }


def run(model, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return model(x, t, ctx[:, :20])  # shorter context: the model pads it to 512 as Wan does


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["folder", "orig_fp32", "orig_prefixed", "diffusers_single"])
def test_parity_with_diffusers(layout, files, inputs, expected):
    model = load_dit(files[layout])
    assert model.cfg.num_heads == 2 and model.cfg.num_layers == 2
    out = run(model, inputs)
    assert out.shape == expected.shape and out.dtype == torch.float32
    err = rel_err(out, expected)
    print(f"DiT {layout}: max abs err / output scale = {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("layout,dtype", [("orig_fp16", torch.float16), ("orig_bf16", torch.bfloat16)])
def test_half_files_equal_rounded_reference(layout, dtype, ref, files, inputs):
    """A half-precision file computed in fp32 equals the reference with weights rounded the same way."""
    rounded = diffusers_transformer(TINY_DIT, seed=1)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
    x, t, ctx = inputs
    with torch.no_grad():
        want = rounded(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert rel_err(run(load_dit(files[layout]), inputs), want) <= 1e-4


def _dequantized_model(path):
    """Reference: our model from an fp32 file holding the fp8 weights dequantised by hand."""
    from safetensors.torch import load_file
    sd = load_file(path)
    plain = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith("scale_weight"):
            continue
        w = v.float()
        scale = sd.get(k[: -len("weight")] + "scale_weight")
        plain[k] = w * scale.float() if scale is not None else w
    out = path.replace(".safetensors", "_dequant.safetensors")
    save_file(plain, out)
    return load_dit(out)


@pytest.mark.parametrize("layout,fp8", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2),
                                        ("fp8_scaled", torch.float8_e4m3fn)])
def test_fp8_stays_fp8_and_equals_manual_dequant(layout, fp8, files, inputs):
    model = load_dit(files[layout])
    q = model.blocks[0].self_attn.q
    assert isinstance(q, Linear) and q.weight.dtype == fp8
    assert (q.scale_weight is not None) == (layout == "fp8_scaled")
    want = run(_dequantized_model(files[layout]), inputs)
    assert rel_err(run(model, inputs), want) <= 1e-5


def test_weight_dtype_fp8_on_load(files, inputs, expected):
    model = load_dit(files["orig_fp32"], weight_dtype=torch.float8_e4m3fn)
    ffn = model.blocks[1].ffn[0]
    assert ffn.weight.dtype == torch.float8_e4m3fn
    assert ffn.scale_weight.shape == (ffn.out_features, 1)  # one scale per output channel
    assert model.blocks[0].modulation.dtype == torch.float32  # small tables stay fp32
    err = rel_err(run(model, inputs), expected)
    assert err < 0.05  # fp8 rounding, but the same function
    from fastvideo_nodes.ops.linear import quantize_fp8 as q8
    for std in (0.01, 0.02):  # Wan-sized weights: a plain cast (ComfyUI's fp8_e4m3fn) loses more
        w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * std
        q, scale = q8(w, torch.float8_e4m3fn)
        per_channel = ((q.float() * scale - w).norm() / w.norm()).item()
        plain = ((w.to(torch.float8_e4m3fn).float() - w).norm() / w.norm()).item()
        assert per_channel < 0.03 and per_channel < plain


def test_fp8_matmul_close_to_full_precision(files, inputs, expected):
    """fp8 × fp8 products with per-token activation scales (the CPU runs the same arithmetic as
    torch._scaled_mm in float32); asked for on CPU, loading keeps plain dequantisation."""
    from fastvideo_nodes.ops.linear import enable_fp8_matmul, fp8_linear
    model = load_dit(files["orig_fp32"], fp8_matmul=True)
    assert not any(getattr(m, "fp8_matmul", False) for m in model.modules())
    assert enable_fp8_matmul(model.blocks) == 2 * 10  # per block: 8 attention linears + 2 FFN linears
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "modulation" in name:
            p.data = p.data.float()
    got = run(model, inputs)
    assert rel_err(got, expected) < 0.08
    layer = model.blocks[0].ffn[0]
    x = torch.randn(5, layer.in_features, dtype=torch.bfloat16)
    want = x.float() @ layer.dequantized_weight(torch.float32).t() + layer.bias.float()
    assert rel_err(fp8_linear(x, layer.weight, layer.scale_weight, layer.bias).float(), want) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 tensor cores: compute capability 8.9+")
def test_fp8_matmul_cuda_equals_emulation():
    from fastvideo_nodes.ops.linear import fp8_linear
    from fastvideo_nodes.ops.linear import quantize_fp8 as q8
    g = torch.Generator().manual_seed(0)
    w, scale = q8(torch.randn(384, 256, generator=g) * 0.02, torch.float8_e4m3fn)
    x, bias = torch.randn(3, 70, 256, generator=g).bfloat16(), torch.randn(384, generator=g).bfloat16()
    cpu = fp8_linear(x, w, scale, bias).float()
    gpu = fp8_linear(x.cuda(), w.cuda(), scale.cuda(), bias.cuda()).float().cpu()
    assert rel_err(gpu, cpu) < 1e-2  # bf16 output rounding and accumulation order only


def test_compute_dtype_bf16(files, inputs, expected):
    model = load_dit(files["orig_fp32"], dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert rel_err(run(model, inputs), expected) < 0.05


def test_config_read_off_real_shapes():
    """1.3B and 14B shapes give the published configurations."""
    for dim, ffn, layers, heads in [(1536, 8960, 30, 12), (5120, 13824, 40, 40)]:
        shapes = {"patch_embedding.weight": (dim, 16, 1, 2, 2), "blocks.0.ffn.0.weight": (ffn, dim),
                  "text_embedding.0.weight": (dim, 4096), "time_embedding.0.weight": (dim, 256),
                  "head.head.weight": (64, dim), f"blocks.{layers - 1}.modulation": (1, 6, dim)}
        cfg = config_from_shapes(shapes)
        assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (dim, ffn, layers, heads, 128)
        assert cfg.out_channels == 16 and cfg.size_name == {1536: "1.3B", 5120: "14B"}[dim]


# ----------------------------------------------------------------------------- bad input

def _write(path, tensors):
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("tensors,needle", [
    ({"decoder.middle.0.residual.0.gamma": (4,), "encoder.conv1.weight": (4, 3, 3, 3, 3)}, "Wan2.1 VAE"),
    ({"decoder.middle.0.residual.0.gamma": (4,), "decoder.upsamples.0.upsamples.0.residual.2.weight": (4,)},
     "Wan2.2 VAE"),
    ({"shared.weight": (10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}, "text encoder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4), "first_stage_model.decoder.conv_in.weight": (4,)},
     "Stable Diffusion"),
    ({"vision_model.encoder.layers.0.self_attn.q_proj.weight": (4, 4)}, "CLIP vision image encoder"),
    ({"foo.weight": (2, 2)}, "not a recognised"),
])
def test_wrong_kind_of_file_is_named(tmp_path, tensors, needle):
    p = _write(tmp_path / "x.safetensors", tensors)
    with pytest.raises(ModelFileError, match=needle) as e:
        load_dit(p)
    assert "x.safetensors" in str(e.value)


def test_wan22_5b_in_channels_need_48_out(tmp_path, files):
    from safetensors.torch import load_file
    sd = load_file(files["orig_fp32"])
    sd["patch_embedding.weight"] = torch.zeros(256, 48, 1, 2, 2)
    p = str(tmp_path / "wan22_5b.safetensors")
    save_file(sd, p)
    with pytest.raises(ModelFileError, match="48 input channels .* but its head gives 16"):
        load_dit(p)  # 48 in with a 16-channel head: neither Wan2.1 nor Wan2.2 TI2V-5B


def test_truncated_file(tmp_path, files):
    data = open(files["orig_fp16"], "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_dit(str(p))


def test_missing_path_and_pickle(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_dit(str(tmp_path / "nope.safetensors"))
    ckpt = tmp_path / "wan.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelFileError, match="pickle"):
        load_dit(str(ckpt))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        load_dit(str(tmp_path / "emptydir"))


def test_missing_tensors_named(tmp_path, files):
    from safetensors.torch import load_file
    sd = load_file(files["orig_fp32"])
    del sd["blocks.1.ffn.2.bias"]
    p = str(tmp_path / "incomplete.safetensors")
    save_file(sd, p)
    with pytest.raises(ModelFileError, match="blocks.1.ffn.2.bias"):
        load_dit(p)


def test_folder_with_only_pickle_weights(tmp_path, files):
    d = tmp_path / "pk" / "transformer"
    d.mkdir(parents=True)
    (d / "config.json").write_text(open(os.path.join(files["folder"], "transformer", "config.json")).read())
    (d / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="pickle"):
        load_dit(str(tmp_path / "pk"))


def test_compiled_blocks_equal_eager(inputs):
    """torch.compile on the blocks, attention as one opaque op: same output as eager (CPU, fp32)."""
    from fastvideo_nodes.testing.dit import random_dit
    model = random_dit(seed=3)
    x, t, ctx = inputs
    with torch.inference_mode():
        want = model(x, t, ctx)
        got = model.compile_blocks()(x, t, ctx)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA")
def test_fused_kernels_dit_close_to_torch_path(inputs):
    """The tiny DiT in bf16 on CUDA: eager forward with the fused ops' kernels (Triton, cuBLASLt
    epilogue) against the same forward with every op on its torch math (tests/test_ops.py checks
    each op alone)."""
    from fastvideo_nodes.models.wan_dit import keep_fp32
    from fastvideo_nodes.ops import fused
    from fastvideo_nodes.ops.triton_kernels import triton_available
    from fastvideo_nodes.testing.dit import random_dit
    if not triton_available():
        pytest.skip("the Triton kernels need Triton")
    model = random_dit(seed=3).cuda().bfloat16()
    for name, p in model.named_parameters():
        if keep_fp32(name):
            p.data = p.data.float()
    x, t, ctx = (v.cuda() for v in inputs)
    with torch.inference_mode():
        got = model(x, t, ctx, attention_backend="TORCH_SDPA")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "_cuda", lambda x: False)
            want = model(x, t, ctx, attention_backend="TORCH_SDPA")
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 0.02  # bf16 roundings in a different order only
