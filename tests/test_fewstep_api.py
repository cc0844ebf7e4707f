"""LoRA and few-step sampling through the public faces: API, worker pool, CLI and nodes.

The merge math is tested in test_lora.py and the schedules in test_schedulers.py; here the
question is whether every face passes the same LoRAs and sigmas down, and whether generators that
share one loaded DiT but carry different LoRAs each get their own model.
"""
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastvideo_nodes.cli import main as cli_main
from fastvideo_nodes.cli import parse_lora
from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.models.wan_dit import WanDiTConfig
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.inputs import check_loras, parse_sigmas
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats
from fastvideo_nodes.testing.dit import TINY_DIT, quantize_fp8, random_dit, save_original
from fastvideo_nodes.testing.lora import save_random_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nodes as fv  # noqa: E402

SIZE = dict(height=32, width=48, num_frames=5)
PROMPT = "a small red boat drifting on a calm lake at sunset"
EMB = (torch.randn(1, 12, TINY_DIT.text_dim, generator=torch.Generator().manual_seed(0)),
       torch.randn(1, 7, TINY_DIT.text_dim, generator=torch.Generator().manual_seed(1)))
FOUR_STEP = (1.0, 0.9375, 0.8333, 0.625)


@pytest.fixture(scope="module")
def files(tiny_model_set):
    return tiny_model_set["comfy_fp32"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    wide = WanDiTConfig(dim=384, ffn_dim=512, num_heads=3, num_layers=2, text_dim=TINY_DIT.text_dim)
    return {"a": save_random_lora(TINY_DIT, str(d / "a.safetensors"), rank=4, seed=1, scale=0.2),
            "b": save_random_lora(TINY_DIT, str(d / "b.safetensors"), rank=8, alpha=4.0, seed=2, scale=0.2),
            "wide": save_random_lora(wide, str(d / "wide.safetensors"), seed=3)}


def generator(files, **kw):
    return VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
                                          device="cpu", dtype="fp32", **kw)


def settings(**kw):
    return SamplingSettings(**{**dict(SIZE, steps=3, guidance_scale=3.0, scheduler="euler", seed=5), **kw})


# ----------------------------------------------------------------------------- API


def test_generators_sharing_one_dit_equal_separately_loaded_ones(files, loras):
    base = generator(files)
    a = base.with_loras([(loras["a"], 1.0)])
    ab = base.with_loras([(loras["a"], 0.5), (loras["b"], -0.75)])
    s = settings()
    # Interleaved on purpose: each call must see its own list, whatever ran before on the shared DiT.
    got = {"a": a.sample(*EMB, s), "ab": ab.sample(*EMB, s), "base": base.sample(*EMB, s), "a2": a.sample(*EMB, s)}
    assert a._parts.dit is base._parts.dit is ab._parts.dit  # loaded once
    assert base.loras == () and a.loras == ((os.path.abspath(loras["a"]), 1.0),)
    want = {"a": generator(files, loras=[(loras["a"], 1.0)]).sample(*EMB, s),
            "ab": generator(files, loras=[(loras["a"], 0.5), (loras["b"], -0.75)]).sample(*EMB, s),
            "base": generator(files).sample(*EMB, s)}
    for k in ("a", "ab", "base"):
        assert torch.equal(got[k], want[k]), k  # restore() is exact and the merge deterministic
    assert torch.equal(got["a2"], want["a"])
    assert (got["a"] - got["base"]).abs().max() > 1e-3 and (got["ab"] - got["a"]).abs().max() > 1e-3


def test_set_loras_changes_the_list_in_place(files, loras):
    gen = generator(files)
    assert gen.set_loras([(loras["a"], 1.0)]) is None  # DiT not loaded yet: merged at the next sampling
    s = settings(steps=2)
    first = gen.sample(*EMB, s)
    report = gen.set_loras([])  # loaded now: applied at once
    assert report.patched == 0 and gen._parts.dit.loras == []
    assert torch.equal(gen.sample(*EMB, s), generator(files).sample(*EMB, s))
    assert not torch.equal(first, gen.sample(*EMB, s))


@pytest.mark.parametrize("bad,needle", [
    ("x.safetensors", "list of \\(path, strength\\) pairs"),
    ([("x.safetensors",)], "must be a \\(path, strength\\) pair"),
    ([(None, 1.0)], "the path must be a file name"),
])
def test_check_loras_shapes(bad, needle):
    with pytest.raises(FastVideoError, match=needle):
        check_loras(bad)


def test_check_loras_files_and_strengths(loras, tmp_path):
    with pytest.raises(FastVideoError, match="finite number"):
        check_loras([(loras["a"], float("nan"))])
    with pytest.raises(FastVideoError, match="finite number"):
        check_loras([(loras["a"], True)])
    with pytest.raises(ModelFileError, match="LoRA: file not found"):
        check_loras([(str(tmp_path / "none.safetensors"), 1.0)])
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="pickle checkpoint"):
        VideoGenerator.from_pretrained(loras["a"], loras=[(str(pickle), 1.0)])


def test_a_lora_for_another_width_fails_before_sampling_and_leaves_the_model(files, loras):
    gen = generator(files)
    s = settings(steps=2)
    base = gen.sample(*EMB, s)
    with pytest.raises(ModelFileError, match="made for width 384.*loaded model is width 256"):
        gen.with_loras([(loras["wide"], 1.0)]).sample(*EMB, s)
    assert torch.equal(gen.sample(*EMB, s), base)


def test_parse_sigmas():
    assert parse_sigmas(None) is None and parse_sigmas("  ") is None
    assert parse_sigmas("1, 0.9375,0.8333 ,0.625") == FOUR_STEP
    assert parse_sigmas([1, 0.5]) == (1.0, 0.5)
    for bad in ("1,abc", [1, "x"], 3.0):
        with pytest.raises(FastVideoError, match="sigmas must be numbers"):
            parse_sigmas(bad)


def test_few_step_cfg1_generate_video(files, loras):
    """4 steps at CFG 1: one forward per step, no negative prompt encoded, merge time in timings."""
    gen = generator(files, loras=[(loras["a"], 1.0)])
    encoded = []
    enc = gen.text_encoder
    real = enc.encode
    enc.encode = lambda prompts: encoded.extend(prompts) or real(prompts)
    steps = []
    kw = dict(guidance_scale=1.0, num_inference_steps=4, flow_shift=5.0, scheduler="euler", spacing="simple", seed=3,
              **SIZE)
    r = gen.generate_video(PROMPT, callback=lambda i, n, x0: steps.append((i, n)), **kw)
    assert encoded == [PROMPT]
    assert (r.stats.cond_forwards, r.stats.uncond_forwards) == (4, 0)
    assert steps == [(i, 4) for i in range(1, 5)]
    assert r.timings["lora_s"] > 0
    assert gen.generate_video(PROMPT, **kw).timings["lora_s"] == 0.0  # already merged
    # The same latents through sample(): generate_video passes spacing and the LoRA alike.
    s = SamplingSettings(steps=4, guidance_scale=1.0, shift=5.0, scheduler="euler", spacing="simple", seed=3, **SIZE)
    assert torch.equal(r.latents, gen.sample(gen.encode_prompt(PROMPT), None, s))


def test_generate_video_sigmas_and_lcm(files):
    gen = generator(files)
    steps = []
    kw = dict(guidance_scale=1.0, scheduler="lcm", seed=3, **SIZE)
    r = gen.generate_video(PROMPT, sigmas=list(FOUR_STEP), num_inference_steps=50,
                           callback=lambda i, n, x0: steps.append((i, n)), **kw)
    assert steps == [(i, 4) for i in range(1, 5)]  # the list decides the step count
    s = SamplingSettings(guidance_scale=1.0, scheduler="lcm", seed=3, sigmas=FOUR_STEP, **SIZE)
    assert torch.equal(r.latents, gen.sample(gen.encode_prompt(PROMPT), None, s))
    assert not torch.equal(r.latents, gen.generate_video(PROMPT, sigmas="1,0.75,0.5,0.25", **kw).latents)
    with pytest.raises(FastVideoError, match="scheduler 'unipc' follows diffusers' own spacing"):
        gen.generate_video(PROMPT, scheduler="unipc", spacing="simple", **SIZE)
    with pytest.raises(FastVideoError, match="strictly descending"):
        gen.generate_video(PROMPT, sigmas=[1.0, 1.0], scheduler="euler", **SIZE)


def test_distilled_full_checkpoint_in_the_original_layout(files, tmp_path):
    """lightx2v's distilled T2V checkpoints ship as original Wan single files (prefixed, maybe scaled
    fp8): they load like any other Wan file and sample at CFG 1 with the simple spacing."""
    sd = random_dit(TINY_DIT, seed=9).state_dict()
    path = save_original(quantize_fp8(sd, scaled=True), str(tmp_path / "wan2.1_t2v_distill_fp8_scaled.safetensors"),
                         dtype=None, prefix="model.diffusion_model.")
    assert "scaled_fp8" in load_file(path) or any(k.endswith("scale_weight") for k in load_file(path))
    gen = VideoGenerator.from_pretrained(path, text_encoder=files["text_encoder"], vae=files["vae"], device="cpu",
                                         dtype="fp32")
    r = gen.generate_video(PROMPT, guidance_scale=1.0, num_inference_steps=4, flow_shift=5.0, scheduler="euler",
                           spacing="simple", **SIZE)
    assert r.frames.shape == (5, 32, 48, 3) and bool(torch.isfinite(r.latents).all())
    assert (r.stats.cond_forwards, r.stats.uncond_forwards) == (4, 0)
    # and the same weights unquantised give nearly the same video (fp8 storage is the only difference)
    ref = save_original(sd, str(tmp_path / "fp32.safetensors"), dtype=None)
    want = VideoGenerator.from_pretrained(ref, text_encoder=files["text_encoder"], vae=files["vae"], device="cpu",
                                          dtype="fp32").generate_video(PROMPT, guidance_scale=1.0,
                                                                       num_inference_steps=4, flow_shift=5.0,
                                                                       scheduler="euler", spacing="simple", **SIZE)
    err = (r.latents - want.latents).abs().max() / want.latents.abs().max()
    assert 0 < err < 0.1, err


# ----------------------------------------------------------------------------- worker pool


def test_pool_workers_apply_the_same_loras(files, loras):
    gen = generator(files, loras=[(loras["a"], 1.0)])
    par = gen.with_parallel(2)
    s = settings()
    try:
        stats = SamplingStats()
        got = par.sample(*EMB, s, stats=stats)
        want = gen.sample(*EMB, s)
        assert stats.extra["lora_s"] > 0
        # fp32 on CPU; ranks run fewer threads, so sums may be added in another order (see test_parallel.py)
        assert (got - want).abs().max() <= 2e-5 * want.abs().max()
        other = par.with_loras([(loras["b"], 0.7)])  # same pool, another list: the workers re-merge
        got_b = other.sample(*EMB, s)
        want_b = gen.with_loras([(loras["b"], 0.7)]).sample(*EMB, s)
        assert (got_b - want_b).abs().max() <= 2e-5 * want_b.abs().max()
        assert other.pool() is par.pool()
        with pytest.raises(FastVideoError, match="made for width 384"):
            par.with_loras([(loras["wide"], 1.0)]).sample(*EMB, s)
        assert par.pool().alive  # a LoRA that does not fit fails the job, not the pool
        again = par.sample(*EMB, s)
        assert (again - want).abs().max() <= 2e-5 * want.abs().max()
    finally:
        par.close()


# ----------------------------------------------------------------------------- CLI


def test_parse_lora(loras, tmp_path):
    a = loras["a"]
    assert parse_lora(a) == (a, 1.0)
    assert parse_lora(f"{a}:0.5") == (a, 0.5)
    assert parse_lora(f"{a}:-1") == (a, -1.0)
    colon = tmp_path / "odd:name.safetensors"  # a name that exists as given is a file
    colon.write_bytes(b"x")
    assert parse_lora(str(colon)) == (str(colon), 1.0)
    with pytest.raises(FastVideoError, match="strength after the colon must be a number .*'abc'"):
        parse_lora(f"{a}:abc")
    with pytest.raises(FastVideoError, match="finite number"):
        parse_lora(f"{a}:nan")
    with pytest.raises(FastVideoError, match="--lora: file not found"):
        parse_lora(str(tmp_path / "missing.safetensors:0.5"))


@pytest.mark.parametrize("flags,needle", [
    (["--lora", "missing.safetensors"], "--lora: file not found: 'missing.safetensors'"),
    (["--lora", "{a}:strong"], "the strength after the colon must be a number"),
    (["--sigmas", "1,half"], "--sigmas must be numbers"),
    (["--sigmas", "0.5,0.9"], "sigmas must be strictly descending"),
    (["--scheduler", "unipc", "--spacing", "simple"], "need scheduler 'euler' or 'lcm'"),
])
def test_cli_bad_few_step_input_is_one_line(files, loras, flags, needle, capsys, tmp_path):
    flags = [f.format(a=loras["a"]) for f in flags]
    code = cli_main(["generate", "--model", files["model"], "--text-encoder", files["text_encoder"], "--vae",
                     files["vae"], "--prompt", "x", "--device", "cpu", "--output", str(tmp_path / "o.mp4"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o.mp4")


def test_cli_few_step_run_equals_the_api(files, loras, tmp_path, capsys):
    out, lat = str(tmp_path / "v.mp4"), str(tmp_path / "v.safetensors")
    code = cli_main(["generate", "--model", files["model"], "--text-encoder", files["text_encoder"], "--vae",
                     files["vae"], "--prompt", PROMPT, "--device", "cpu", "--precision", "fp32",
                     "--height", "32", "--width", "48", "--num-frames", "5", "--guidance-scale", "1",
                     "--scheduler", "lcm", "--sigmas", "1,0.9375,0.8333,0.625", "--seed", "4",
                     "--lora", f"{loras['a']}:0.5", "--lora", loras["b"], "--output", out, "--latents-out", lat])
    assert code == 0, capsys.readouterr().err
    assert "LoRA merge" in capsys.readouterr().out
    gen = generator(files, loras=[(loras["a"], 0.5), (loras["b"], 1.0)])
    want = gen.generate_video(PROMPT, guidance_scale=1.0, scheduler="lcm", sigmas=FOUR_STEP, seed=4, **SIZE)
    assert torch.equal(load_file(lat)["latents"], want.latents)


# ----------------------------------------------------------------------------- nodes


def test_lora_nodes_chain_without_touching_their_input(files, loras):
    model = generator(files)
    (one,) = fv.FastVideoLoRA().apply(model, loras["a"], 1.0)
    (two,) = fv.FastVideoLoRA().apply(one, loras["b"], 0.5)
    assert model.loras == () and len(one.loras) == 1
    assert two.loras == (one.loras[0], (os.path.abspath(loras["b"]), 0.5))
    assert two._parts is model._parts  # same weights
    assert fv.NODE_DISPLAY_NAME_MAPPINGS["FastVideoLoRA"] == "FastVideo LoRA"
    assert fv.NODE_CLASS_MAPPINGS["FastVideoLoRA"] is fv.FastVideoLoRA
    spec = fv.FastVideoLoRA.INPUT_TYPES()["required"]
    assert spec["model"] == ("FASTVIDEO_MODEL",) and spec["strength"][0] == "FLOAT"
    assert fv.FastVideoLoRA.VALIDATE_INPUTS(strength=1.0) is True
    for bad in (math.nan, 20.0, "x"):
        assert "strength must" in fv.FastVideoLoRA.VALIDATE_INPUTS(strength=bad)
    with pytest.raises(FastVideoError, match="strength must"):
        fv.FastVideoLoRA().apply(model, loras["a"], math.inf)
    with pytest.raises(ModelFileError, match="LoRA: file not found"):
        fv.FastVideoLoRA().apply(model, "nope.safetensors", 1.0)


def test_lora_node_outside_the_loras_folder_is_refused(monkeypatch, tmp_path, loras):
    import types
    root = tmp_path / "loras"
    root.mkdir()
    fake = types.SimpleNamespace(get_folder_paths=lambda kind: [str(root)], get_filename_list=lambda kind: [])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    with pytest.raises(ModelFileError, match="lora_name: .* leaves ComfyUI's loras folder"):
        fv.FastVideoLoRA().apply(None, "../a.safetensors", 1.0)
    with pytest.raises(ModelFileError, match="lora_name: .* not an absolute path"):
        fv.FastVideoLoRA().apply(None, loras["a"], 1.0)


SAMPLER = dict(width=48, height=32, num_frames=5, steps=4, cfg=1.0, shift=5.0, scheduler="euler", seed=2, cfg_gate=1.0,
               teacache_threshold=0.0)


def test_sampler_node_few_step_inputs(files, loras):
    spec = fv.FastVideoSampler.INPUT_TYPES()
    assert "lcm" in spec["required"]["scheduler"][0]
    assert spec["optional"]["spacing"][0] == ["default", "simple"] and spec["optional"]["sigmas"][0] == "STRING"
    ok = fv.FastVideoSampler.VALIDATE_INPUTS
    assert ok(**SAMPLER, spacing="simple", sigmas="") is True
    assert ok(**{**SAMPLER, "scheduler": "lcm"}, sigmas="1, 0.75, 0.5") is True
    assert "sigmas must be numbers" in ok(**SAMPLER, sigmas="1, x")
    assert "strictly descending" in ok(**SAMPLER, sigmas="0.5, 0.75")
    assert "need scheduler 'euler' or 'lcm'" in ok(**{**SAMPLER, "scheduler": "unipc"}, spacing="simple")
    (model,) = fv.FastVideoLoRA().apply(generator(files), loras["a"], 1.0)
    for extra, kw in ((dict(spacing="simple"), dict(spacing="simple")),
                      (dict(sigmas="1,0.9375,0.8333,0.625"), dict(sigmas=FOUR_STEP))):
        (latent,) = fv.FastVideoSampler().sample(model=model, positive=[[EMB[0], {}]], **SAMPLER, **extra)
        s = SamplingSettings(height=32, width=48, num_frames=5, steps=4, guidance_scale=1.0, shift=5.0,
                             scheduler="euler", seed=2, **kw)
        assert torch.equal(latent["samples"], model.sample(EMB[0], None, s))
