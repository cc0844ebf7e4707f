"""LoRA merging: every key layout equals diffusers' load_lora_weights + fuse_lora (or ComfyUI's rule
where diffusers does not read the layout), stacking, fp8 bases within a stated bound, exact undo,
and clear errors for LoRAs that do not fit."""
import copy
import functools
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.loading.dit import load_dit
from fastvideo_nodes.loading.keymaps import dit_name as diffusers_to_wan_name
from fastvideo_nodes.loading.lora import restore, set_loras
from fastvideo_nodes.testing.dit import (
    TINY_DIT,
    diffusers_to_original,
    diffusers_transformer,
    quantize_fp8,
    save_original,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

LINEARS = [f"blocks.{b}.{m}" for b in range(TINY_DIT.num_layers)
           for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                     "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
SEED = 4


@pytest.fixture(scope="module")
def base_sd():
    return diffusers_to_original(reference().state_dict())


@pytest.fixture(scope="module")
def files(base_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_base")
    return {
        "fp32": save_original(base_sd, str(d / "fp32.safetensors"), dtype=None),
        "bf16": save_original(base_sd, str(d / "bf16.safetensors"), dtype=torch.bfloat16),
        "e4m3": save_original(quantize_fp8(base_sd, torch.float8_e4m3fn), str(d / "e4m3.safetensors"), None),
        "scaled": save_original(quantize_fp8(base_sd, scaled=True), str(d / "scaled.safetensors"), None),
    }


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 512, TINY_DIT.text_dim, generator=g)
    ctx[:, 12:] = 0
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700.0]), ctx


@functools.cache
def reference():
    """The diffusers model all bases are made from (built once; copied where it gets changed)."""
    return diffusers_transformer(TINY_DIT, SEED)


@functools.cache
def to_diffusers_names():
    """Original Wan module name → diffusers module name, from the diffusers model's own keys."""
    return {diffusers_to_wan_name(k)[: -len(".weight")]: k[: -len(".weight")]
            for k in reference().state_dict() if k.endswith(".weight")}


def random_pairs(seed, rank=4, modules=LINEARS):
    """{module: (down [r, in], up [out, r])} for our tiny DiT."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in reference().named_parameters()}
    names = to_diffusers_names()
    out = {}
    for m in modules:
        o, i = shapes[names[m] + ".weight"]
        out[m] = (torch.randn(rank, i, generator=g) * 0.2, torch.randn(o, rank, generator=g) * 0.2)
    return out


def write_lora(path, pairs, layout, alpha=None, extra=None):
    """Save `pairs` in one of the layouts found in the wild."""
    names = to_diffusers_names()
    sd = {}
    for m, (down, up) in pairs.items():
        if layout == "wan_down_up":
            k, dn, upn = f"diffusion_model.{m}", "lora_down.weight", "lora_up.weight"
        elif layout == "wan_ab":
            k, dn, upn = f"diffusion_model.{m}", "lora_A.weight", "lora_B.weight"
        elif layout == "peft":
            k, dn, upn = f"transformer.{names[m]}", "lora_A.weight", "lora_B.weight"
        elif layout == "kohya":
            k, dn, upn = "lora_unet_" + m.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        sd[f"{k}.{dn}"], sd[f"{k}.{upn}"] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))
    return str(path)


def comfy_rule(base_sd, loras):
    """ComfyUI's rule, written out: W += s·(alpha/rank)·up@down; W += s·diff; b += s·diff_b."""
    out = {k: v.clone().float() for k, v in base_sd.items()}
    for pairs, alpha, diffs, s in loras:
        for m, (down, up) in pairs.items():
            rank = down.shape[0]
            out[m + ".weight"] += s * ((alpha or rank) / rank) * (up @ down)
        for name, delta in diffs.items():
            out[name] += s * delta.reshape(out[name].shape)
    return out


def diffusers_fused(loras):
    """diffusers' merge: each LoRA loaded as an adapter with its weight, then fuse_lora."""
    model = copy.deepcopy(reference())
    pipe = diffusers.WanPipeline(transformer=model, vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, [s for _, s in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return model


def forward(model, inputs, diffusers_model=False):
    x, t, ctx = inputs
    with torch.no_grad():
        if diffusers_model:
            return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        return model(x, t, ctx[:, :12])


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_weights(model, want, atol=2e-6):
    got = model.state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k].float(), v.float(), atol=atol, rtol=0), k


DIFF_B = {"blocks.0.self_attn.q": 256, "blocks.1.cross_attn.o": 256, "blocks.0.ffn.0": 512}


@pytest.mark.parametrize("layout,alpha,with_bias", [("wan_down_up", 2.0, False), ("wan_down_up", None, True),
                                                    ("wan_ab", None, False), ("peft", None, False)])
def test_layouts_equal_diffusers_fuse_lora(layout, alpha, with_bias, files, base_sd, inputs, tmp_path):
    pairs = random_pairs(1)
    g = torch.Generator().manual_seed(9)
    extra = {f"diffusion_model.{m}.diff_b": torch.randn(n, generator=g) * 0.1 for m, n in DIFF_B.items()} \
        if with_bias else {}
    path = write_lora(tmp_path / "l.safetensors", pairs, layout, alpha, extra)
    ref = diffusers_fused([(path, 0.5)])
    ours = load_dit(files["fp32"])
    report = set_loras(ours, [(path, 0.5)])
    keys_per_pair = 2 + (alpha is not None)
    assert report.loras[0].unmatched == [] and report.loras[0].matched == len(pairs) * keys_per_pair + len(extra)
    assert report.loras[0].layout == {"wan_down_up": "wan", "wan_ab": "wan", "peft": "diffusers"}[layout]
    assert_weights(ours, diffusers_to_original(ref.state_dict()))
    want = forward(ref, inputs, diffusers_model=True)
    got = forward(ours, inputs)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    # and the LoRA did change the output
    assert not torch.allclose(got, forward(load_dit(files["fp32"]), inputs), atol=1e-3)


def test_two_stacked_loras_equal_diffusers(files, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_pairs(1), "wan_down_up", alpha=2.0)
    b = write_lora(tmp_path / "b.safetensors", random_pairs(2, rank=8, modules=LINEARS[:6]), "peft")
    ref = diffusers_fused([(a, 0.5), (b, -0.75)])
    ours = load_dit(files["fp32"])
    set_loras(ours, [(a, 0.5), (b, -0.75)])
    assert_weights(ours, diffusers_to_original(ref.state_dict()))


def test_kohya_and_full_deltas_follow_the_comfyui_rule(files, base_sd, tmp_path):
    """diffusers reads neither kohya Wan keys nor norm/modulation deltas: ComfyUI's rule is the oracle."""
    g = torch.Generator().manual_seed(3)
    diffs = {"blocks.0.norm3.weight": torch.randn(256, generator=g) * 0.1,
             "blocks.1.self_attn.norm_q.weight": torch.randn(256, generator=g) * 0.1,
             "blocks.0.modulation": torch.randn(1, 6, 256, generator=g) * 0.1,
             "head.modulation": torch.randn(1, 2, 256, generator=g) * 0.1,
             "patch_embedding.weight": torch.randn(256, 16, 1, 2, 2, generator=g) * 0.01,
             "text_embedding.0.bias": torch.randn(256, generator=g) * 0.1,
             "head.head.weight": torch.randn(64, 256, generator=g) * 0.01}
    as_keys = {}
    for name, t in diffs.items():
        if name.endswith(".bias"):
            as_keys[f"diffusion_model.{name[:-5]}.diff_b"] = t
        else:
            as_keys[f"diffusion_model.{name.removesuffix('.weight')}.diff"] = t
    k_pairs = random_pairs(5)
    kohya = write_lora(tmp_path / "k.safetensors", k_pairs, "kohya", alpha=8.0)
    deltas = write_lora(tmp_path / "d.safetensors", {}, "wan_down_up", extra=as_keys)
    ours = load_dit(files["fp32"])
    report = set_loras(ours, [(kohya, 0.5), (deltas, 1.5)])
    assert [r.layout for r in report.loras] == ["kohya", "wan"]
    assert report.loras[1].matched == len(diffs) and report.patched == len(LINEARS) + len(diffs)
    assert_weights(ours, comfy_rule(base_sd, [(k_pairs, 8.0, {}, 0.5), ({}, None, diffs, 1.5)]), atol=1e-5)


def test_bf16_base_merges_exactly_once(files, base_sd, tmp_path):
    """bf16 storage: the merge is the float32 sum, rounded once to bf16."""
    pairs = random_pairs(1)
    path = write_lora(tmp_path / "l.safetensors", pairs, "wan_ab")
    ours = load_dit(files["bf16"], dtype=torch.bfloat16)
    bf16_base = {k: v.to(torch.bfloat16) for k, v in base_sd.items()}
    set_loras(ours, [(path, 0.5)])
    want = comfy_rule(bf16_base, [(pairs, None, {}, 0.5)])
    got = ours.state_dict()
    for m in pairs:
        assert got[m + ".weight"].dtype == torch.bfloat16
        assert torch.equal(got[m + ".weight"], want[m + ".weight"].to(torch.bfloat16)), m


@pytest.mark.parametrize("kind", ["e4m3", "scaled"])
def test_fp8_merge_within_its_bound_of_the_bf16_merge(kind, files, base_sd, inputs, tmp_path):
    """Dequantise, merge in float32, re-quantise per output channel. Bound per element: half an e4m3
    step, 2⁻⁴·|w|, plus the row's subnormal spacing, against the exact merge of the same fp8 base;
    the bf16 merge differs from that exact merge by at most 2⁻⁸·|w|."""
    pairs = random_pairs(1)
    path = write_lora(tmp_path / "l.safetensors", pairs, "wan_down_up", alpha=2.0)
    fp8 = load_dit(files[kind])
    dequant = {m: fp8.get_submodule(m).dequantized_weight(torch.float32) for m in pairs}
    set_loras(fp8, [(path, 1.0)])
    bf16 = load_dit(files["bf16"], dtype=torch.bfloat16)
    set_loras(bf16, [(path, 1.0)])
    for m, (down, up) in pairs.items():
        layer = fp8.get_submodule(m)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale_weight.shape == (layer.out_features, 1)
        merged = layer.dequantized_weight(torch.float32)
        exact = dequant[m] + 0.5 * (up @ down)
        row_step = layer.scale_weight * 2.0 ** -9  # e4m3's subnormal spacing in this row's scale
        assert ((merged - exact).abs() <= 2.0 ** -4 * exact.abs() + row_step).all(), m
        ref = bf16.get_submodule(m).weight.float()
        assert ((merged - ref).abs() <= 2.0 ** -4 * exact.abs() + 2.0 ** -8 * ref.abs() + row_step
                + (dequant[m] - base_sd[m + ".weight"].to(torch.bfloat16).float()).abs()).all(), m
    out_fp8, out_bf16 = forward(fp8, inputs), forward(bf16, inputs).float()
    assert ((out_fp8 - out_bf16).abs().max() / out_bf16.abs().max()).item() < 0.1


@pytest.mark.parametrize("kind,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("scaled", torch.float32),
                                        ("e4m3", torch.float32)])
def test_set_loras_restores_the_base_bit_exactly(kind, dtype, files, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", random_pairs(1), "wan_down_up", alpha=2.0,
                   extra={"diffusion_model.blocks.0.modulation.diff": torch.ones(1, 6, 256)})
    b = write_lora(tmp_path / "b.safetensors", random_pairs(2, modules=LINEARS[:5]), "kohya")
    model = load_dit(files[kind], dtype=dtype)
    base = state(model)
    set_loras(model, [(a, 1.0)])
    once = state(model)
    assert not torch.equal(once["blocks.0.modulation"], base["blocks.0.modulation"])
    copies = {name: t for name, (t, _) in model.lora_backup.items()}
    set_loras(model, [(a, 0.3), (b, 1.0)])
    assert all(model.lora_backup[name][0] is t for name, t in copies.items())  # the base is not copied again
    set_loras(model, [(a, 1.0)])  # changing strengths starts from the base, never accumulates
    again = state(model)
    assert once.keys() == again.keys() and all(torch.equal(once[k], again[k]) for k in once)
    assert set_loras(model, []).patched == 0
    after = state(model)
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    assert restore(model) == 0 and model.loras == []


def test_partial_match_merges_the_rest_and_reports_the_others(files, tmp_path, caplog):
    extra = {f"diffusion_model.blocks.{i}.self_attn.q.lora_down.weight": torch.zeros(4, 256) for i in (7, 8, 9)}
    extra["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(4, 256)
    path = write_lora(tmp_path / "p.safetensors", random_pairs(1, modules=LINEARS[:2]), "wan_down_up", extra=extra)
    model = load_dit(files["fp32"])
    with caplog.at_level(logging.WARNING, logger="fastvideo_nodes.loading.lora"):
        merge = set_loras(model, [(path, 1.0)])
    report = merge.loras[0]
    assert merge.patched == 2 and merge.seconds > 0
    assert report.matched == 4 and sorted(report.unmatched) == sorted(extra)
    assert "lora key not loaded: 4" in caplog.text and "image-to-video" in caplog.text


def bad_lora(tmp_path, sd, name="bad.safetensors"):
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


@pytest.mark.parametrize("sd,needle", [
    ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 8)}, "LoRA for a Flux model"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
     "Stable Diffusion \\(UNet\\) model"),
    ({"diffusion_model.img_emb.proj.1.lora_down.weight": torch.zeros(4, 8),
      "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(8, 4)}, "Wan image-to-video layers"),
    ({"some.weight": torch.zeros(3)}, "holds no LoRA tensors"),
])
def test_loras_for_other_models_are_refused(sd, needle, files, tmp_path):
    model = load_dit(files["fp32"])
    with pytest.raises(ModelFileError, match=f"none of the {len(sd)} tensors in 'bad.safetensors' match.*{needle}"):
        set_loras(model, [(bad_lora(tmp_path, sd), 1.0)])


def test_a_lora_for_another_wan_size_names_both_sizes(files, tmp_path):
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)}
    model = load_dit(files["fp32"])
    base = state(model)
    with pytest.raises(ModelFileError, match="does not fit this DiT at 'blocks.0.self_attn.q.weight'.*made for "
                                             "Wan2.1 1.3B \\(width 1536\\), the loaded model is width 256"):
        set_loras(model, [(bad_lora(tmp_path, sd), 1.0)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # untouched


def test_wrong_rank_and_half_pairs_are_clear_errors(files, tmp_path):
    model = load_dit(files["fp32"])
    wrong_rank = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256),
                  "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(512, 8)}
    with pytest.raises(ModelFileError, match="up \\(512, 8\\) does not fit down \\(4, 256\\) \\(rank 4\\)"):
        set_loras(model, [(bad_lora(tmp_path, wrong_rank), 1.0)])
    half = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256)}
    with pytest.raises(ModelFileError, match="only one half of the LoRA pair for 'blocks.0.ffn.0.weight'"):
        set_loras(model, [(bad_lora(tmp_path, half, "half.safetensors"), 1.0)])


def test_pickle_loras_and_bad_strengths_are_refused(files, tmp_path):
    model = load_dit(files["fp32"])
    pt = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(ModelFileError, match="'lora.pt' is a pickle checkpoint.*use the .safetensors release"):
        set_loras(model, [(str(pt), 1.0)])
    good = write_lora(tmp_path / "g.safetensors", random_pairs(1, modules=LINEARS[:1]), "wan_ab")
    for s in (math.nan, math.inf, "1"):
        with pytest.raises(FastVideoError, match="strength for 'g.safetensors' must be a finite number"):
            set_loras(model, [(good, s)])


def test_base_copies_stay_on_the_weights_device_only_when_they_fit():
    from fastvideo_nodes.loading.lora import _backup_device
    from fastvideo_nodes.models.wan_dit import WanDiT, WanDiTConfig
    with torch.device("meta"):  # sizes and devices without any memory
        dit = WanDiT(WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2))
    names = ["blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight"]
    need = 64 * 64 * 4 + 128 * 64 * 4
    assert _backup_device(dit, names, {}, room=need).type == "meta"
    assert _backup_device(dit, names, {}, room=need - 1).type == "cpu"
    # copies kept from an earlier merge are not counted again
    assert _backup_device(dit, names, {"blocks.1.ffn.0.weight": None}, room=64 * 64 * 4).type == "meta"
