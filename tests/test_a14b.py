"""Wan2.2 A14B: two experts (high noise for t ≥ boundary·1000, low noise after), each with its own
guidance; latents equal diffusers' WanPipeline with transformer_2 on the same tiny random weights,
the switch at the right step, the idle expert off the device on a small budget, and bad inputs."""
import pytest
import torch

from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.models.wan_vae import raw_to_model
from fastvideo_nodes.pipeline import experts as experts_mod
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats
from fastvideo_nodes.pipeline.schedulers import make_scheduler

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a small red boat drifting on a calm lake", "blurry, static"
SIZE = dict(height=32, width=48, num_frames=5)
STEPS, SHIFT, G_HIGH, G_LOW = 6, 12.0, 4.0, 3.0


@pytest.fixture(scope="module")
def a14b_set(tmp_path_factory):
    from fastvideo_nodes.testing.a14b import build_a14b_set
    return build_a14b_set(str(tmp_path_factory.mktemp("a14b")), seed=0)


@pytest.fixture(scope="module")
def want(a14b_set):
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(a14b_set["folder"], torch_dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=G_HIGH,
                   guidance_scale_2=G_LOW, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                   **SIZE)
    return out.frames


def _settings(**kw):
    return SamplingSettings(**{"steps": STEPS, "shift": SHIFT, "guidance_scale": G_HIGH, "guidance_scale_low": G_LOW,
                               "seed": 3, **SIZE, **kw})


def _comfy(a14b_set, **kw):
    c = a14b_set["comfy_fp32"]
    return VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                          text_encoder=c["text_encoder"], vae=c["vae"], device="cpu", dtype="fp32",
                                          **kw)


def _latents(gen, settings):
    return raw_to_model(gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), settings))


def test_schedule_crosses_the_boundary():
    """The test's schedule really uses both experts (else parity would prove nothing)."""
    sched = make_scheduler("unipc", STEPS, SHIFT)
    which = experts_mod.expert_per_step(sched.timesteps, 0.875)
    assert 0 < which.count(experts_mod.HIGH) < STEPS and which == sorted(which)


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_latents_equal_diffusers_two_experts(a14b_set, want, layout):
    gen = (VideoGenerator.from_pretrained(a14b_set["folder"], device="cpu", dtype="fp32") if layout == "diffusers"
           else _comfy(a14b_set))
    assert gen.files.low_noise_model is not None
    settings = _settings() if layout == "comfy" else _settings(boundary=None)  # folder: its boundary_ratio
    err = (_latents(gen, settings) - want).abs().max().item()
    print(f"A14B {layout}: max abs err {err:.2e} (latent scale {want.abs().max():.2f})")
    assert err <= 1e-3


def test_each_step_runs_the_right_expert_and_guidance(a14b_set, monkeypatch):
    gen = _comfy(a14b_set)
    calls = []
    for name, dit in (("high", gen.dit), ("low", gen.dit_low)):
        real = dit.forward

        def spy(x, t, context, *a, _name=name, _real=real, **kw):
            calls.append((_name, int(t.reshape(-1)[0])))
            return _real(x, t, context, *a, **kw)
        monkeypatch.setattr(dit, "forward", spy)
    boundary = 0.9
    _latents(gen, _settings(boundary=boundary))
    timesteps = [int(t) for t in make_scheduler("unipc", STEPS, SHIFT).timesteps]
    expected = [("high" if t >= boundary * 1000 else "low", t) for t in timesteps for _ in range(2)]  # cond, uncond
    assert calls == expected
    assert {n for n, _ in calls} == {"high", "low"}


def test_low_expert_guidance_is_used(a14b_set, want):
    """Another low-noise guidance changes only what the low expert makes: not equal to the reference."""
    gen = _comfy(a14b_set)
    other = _latents(gen, _settings(boundary=0.875, guidance_scale_low=1.0))
    assert (other - want).abs().max().item() > 1e-2


def test_small_budget_keeps_one_expert_on_the_device(a14b_set, want):
    """A budget with room for one DiT only: the idle expert lives in host memory and is swapped in at
    the switch; the result is unchanged."""
    from fastvideo_nodes.memory.planner import GiB
    gen = _comfy(a14b_set, gpu_memory_gb=1.0)
    gen.load(**SIZE)
    assert gen._parts.experts is not None  # placed by load(); a new plan places them again
    plan = gen.memory_plan
    assert plan is not None and not plan.dit_blocks_streamed
    assert plan.experts == "resident"  # tiny experts: both fit; squeeze the budget to room for one
    dit_bytes = gen.placement.sizes().dit.total
    gen.placement.replace(type(plan)(**{**plan.__dict__, "budget": plan.peak + GiB // 2 - dit_bytes // 2,
                                    "experts": "swap"}))
    seen = []
    for k, dit in enumerate((gen.dit, gen.dit_low)):
        dit.register_forward_pre_hook(lambda m, a, k=k: seen.append((k, gen._parts.experts.active)))
    got = _latents(gen, _settings(boundary=0.875))
    ex = gen._parts.experts
    assert ex.mode == "swap" and ex.switches == 2  # high swapped in, then low in place of it
    assert seen and all(k == active for k, active in seen)
    assert ex.homes[experts_mod.HIGH].device.type == "cpu"  # the idle one went home
    assert (got - want).abs().max().item() <= 1e-3


def test_plan_counts_the_second_expert(a14b_set, caplog):
    """The low-noise expert's bytes come from its own file; both resident costs one more DiT, and
    the logged plan says where the experts live."""
    import logging

    from fastvideo_nodes.memory.planner import VideoShape
    c = a14b_set["comfy_fp32"]
    gen = _comfy(a14b_set, gpu_memory_gb=8.0)
    one = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                         dtype="fp32", gpu_memory_gb=8.0)
    sizes = gen.placement.sizes()
    assert sizes.dit_low == sizes.dit and one.placement.sizes().dit_low is None
    shape = VideoShape(**SIZE)
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.memory.placement"):
        gen.load(**SIZE)
    plan = gen.memory_plan
    assert plan.experts == "resident" and plan.peak == one.placement.make_plan(shape).peak + sizes.dit.total
    assert "both experts (high and low noise) resident" in caplog.text


def test_load_places_both_experts_and_the_first_call_loads_nothing(a14b_set):
    """load() reads the low-noise expert and places both (pinning their homes when they take turns),
    timed into load_s: the first generation does no loading of its own."""
    gen = _comfy(a14b_set, gpu_memory_gb=8.0)
    assert gen._parts.dit_low is None
    gen.load(**SIZE)
    experts, loaded = gen._parts.experts, gen.load_s
    assert experts is not None and gen._parts.dit_low is not None and loaded > 0
    gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), _settings(boundary=0.875))
    assert gen._parts.experts is experts and gen.load_s == loaded


def test_room_for_both_keeps_both_resident(a14b_set):
    gen = _comfy(a14b_set, gpu_memory_gb=8.0)
    gen.load(**SIZE)
    gen.sample(gen.encode_prompt(PROMPT), None, _settings(boundary=0.875, guidance_scale=1.0, guidance_scale_low=1.0))
    assert gen._parts.experts.mode == "resident" and gen._parts.experts.switches == 0


def test_streamed_plan_moves_the_offload_to_the_active_expert(a14b_set, want):
    gen = _comfy(a14b_set, gpu_memory_gb=1.5)  # its own parts (the registry shares by options)
    gen.load(**SIZE)
    assert gen._parts.experts is not None  # placed by load(); a new plan places them again
    plan = gen.memory_plan
    gen.placement.replace(type(plan)(**{**plan.__dict__, "dit_blocks_resident": 1, "experts": "stream"}))
    got = _latents(gen, _settings(boundary=0.875))
    ex = gen._parts.experts
    assert ex.mode == "stream" and ex.offloads[experts_mod.HIGH] is None
    assert ex.offloads[experts_mod.LOW] is not None and ex.offloads[experts_mod.LOW].resident == 1
    assert (got - want).abs().max().item() <= 1e-3


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("boundary", [0.0, 1.0, -0.5, 1.5, float("nan"), "0.8"])
def test_boundary_outside_0_1(boundary):
    with pytest.raises(FastVideoError, match=r"boundary must be a number between 0 and 1 \(exclusive\)"):
        _settings(boundary=boundary).validate()


def test_bad_guidance_low():
    with pytest.raises(FastVideoError, match="guidance_scale_low must be a finite number ≥ 0"):
        _settings(guidance_scale_low=-1.0).validate()


def test_low_expert_of_another_size(a14b_set, tmp_path):
    from fastvideo_nodes.testing import dit as tiny_dit
    other = tiny_dit.random_dit(tiny_dit.WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, text_dim=32))
    path = tiny_dit.save_original(other.state_dict(), str(tmp_path / "low_3_layers.safetensors"), dtype=None)
    c = a14b_set["comfy_fp32"]
    with pytest.raises(ModelFileError) as e:
        VideoGenerator.from_pretrained(c["model"], low_noise_model=path, device="cpu")
    msg = str(e.value)
    assert "'low_3_layers.safetensors' is not the twin of the high-noise expert" in msg
    assert "'wan2.2_t2v_high_noise_tiny.safetensors'" in msg and "num_layers 2 vs 3" in msg


def test_low_expert_with_a_5b_model(a14b_set, tmp_path):
    import dataclasses

    from fastvideo_nodes.testing import dit as tiny_dit
    five = tiny_dit.random_dit(dataclasses.replace(tiny_dit.TINY_DIT, in_channels=48, out_channels=48))
    path = tiny_dit.save_original(five.state_dict(), str(tmp_path / "ti2v.safetensors"), dtype=None)
    with pytest.raises(ModelFileError, match="is Wan2.2 TI2V-5B, a single model; only Wan2.2 A14B comes as two"):
        VideoGenerator.from_pretrained(path, low_noise_model=a14b_set["comfy_fp32"]["low_noise_model"], device="cpu")


def test_low_expert_missing_file(a14b_set, tmp_path):
    with pytest.raises(ModelFileError, match="low_noise_model: .* does not exist"):
        VideoGenerator.from_pretrained(a14b_set["comfy_fp32"]["model"], low_noise_model=str(tmp_path / "nope"))


def test_boundary_on_a_one_dit_model(a14b_set):
    c = a14b_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    with pytest.raises(FastVideoError, match="boundary: only a two-expert model"):
        gen.generate_video(PROMPT, boundary=0.8, num_inference_steps=2, **SIZE)


# ----------------------------------------------------------------------------- a LoRA per expert


@pytest.fixture(scope="module")
def expert_loras(tmp_path_factory):
    """A HIGH and a LOW LoRA, as Wan2.2 Lightning ships them (different ranks and alphas)."""
    from fastvideo_nodes.testing.dit import TINY_DIT
    from fastvideo_nodes.testing.lora import save_random_lora
    d = tmp_path_factory.mktemp("expert_loras")
    return {"high": save_random_lora(TINY_DIT, str(d / "tiny_lora_HIGH.safetensors"), rank=4, seed=1, scale=0.2),
            "low": save_random_lora(TINY_DIT, str(d / "tiny_lora_LOW.safetensors"), rank=8, alpha=4.0, seed=2,
                                    scale=0.2)}


def _by_hand(state: dict, lora_path: str, strength: float, rename=lambda n: n) -> dict:
    """state with the LoRA merged as its definition says: W + s·(alpha/rank)·up @ down, in float32.
    rename: our (Wan) parameter name → the name in `state`."""
    from safetensors.torch import load_file
    lora = load_file(lora_path)
    out = {k: v.clone() for k, v in state.items()}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[len("diffusion_model."):-len(".lora_down.weight")]
        down, up = lora[key].float(), lora[key.replace("lora_down", "lora_up")].float()
        alpha = float(lora[key.replace(".lora_down.weight", ".alpha")])
        name = rename(f"{module}.weight")
        out[name] = (out[name].float() + strength * (alpha / down.shape[0]) * up @ down).to(out[name].dtype)
    return out


def _state(dit) -> dict:
    return {k: v.detach().clone() for k, v in dit.state_dict().items()}


def test_each_expert_takes_its_own_lora_and_removing_restores(a14b_set, expert_loras):
    gen = _comfy(a14b_set)
    gen.load(**SIZE)
    base_high, base_low = _state(gen.dit), _state(gen.dit_low)
    report = gen.set_loras([(expert_loras["high"], 1.0)], [(expert_loras["low"], 0.5)])
    assert [r.path for r in report.loras] == [expert_loras["high"], expert_loras["low"]] and report.patched > 0
    want_high = _by_hand(base_high, expert_loras["high"], 1.0)
    want_low = _by_hand(base_low, expert_loras["low"], 0.5)
    for dit, want in ((gen.dit, want_high), (gen.dit_low, want_low)):
        got = dit.state_dict()
        assert set(got) == set(want)
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert gen.dit.loras == [(expert_loras["high"], 1.0)] and gen.dit_low.loras == [(expert_loras["low"], 0.5)]
    gen.set_loras([(expert_loras["high"], 1.0)])  # only the low expert goes back to its base
    assert all(torch.equal(gen.dit_low.state_dict()[k], v) for k, v in base_low.items())
    gen.set_loras([])
    for dit, base in ((gen.dit, base_high), (gen.dit_low, base_low)):
        assert all(torch.equal(dit.state_dict()[k], v) for k, v in base.items())  # bit for bit


@pytest.fixture(scope="module")
def want_with_loras(a14b_set, expert_loras):
    """diffusers' two-expert WanPipeline with each LoRA merged by hand into its expert's weights."""
    from diffusers import WanPipeline

    from fastvideo_nodes.loading.keymaps import dit_name
    pipe = WanPipeline.from_pretrained(a14b_set["folder"], torch_dtype=torch.float32)
    for model, path, strength in ((pipe.transformer, expert_loras["high"], 1.0),
                                  (pipe.transformer_2, expert_loras["low"], 0.5)):
        state = model.state_dict()
        to_diffusers = {dit_name(k): k for k in state}
        model.load_state_dict(_by_hand(state, path, strength, rename=to_diffusers.__getitem__))
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=G_HIGH,
                   guidance_scale_2=G_LOW, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                   **SIZE)
    return out.frames


def test_latents_equal_diffusers_with_a_lora_per_expert(a14b_set, expert_loras, want, want_with_loras):
    gen = _comfy(a14b_set, loras=[(expert_loras["high"], 1.0)], loras_low=[(expert_loras["low"], 0.5)])
    stats = SamplingStats()
    got = raw_to_model(gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), _settings(), stats=stats))
    assert (want_with_loras - want).abs().max().item() > 1e-2  # the LoRAs matter
    err = (got - want_with_loras).abs().max().item()
    print(f"A14B with a LoRA per expert: max abs err {err:.2e}")
    assert err <= 1e-3 and "lora_s" in stats.extra


def test_swapped_experts_keep_their_loras_across_changes(a14b_set, expert_loras, want_with_loras):
    """With one expert on the device at a time, a LoRA change after a run (the low expert still swapped
    in) reaches both experts and survives the next swaps."""
    from fastvideo_nodes.memory.planner import GiB
    gen = _comfy(a14b_set, gpu_memory_gb=1.0)
    gen.load(**SIZE)
    plan = gen.memory_plan
    gen.placement.replace(type(plan)(**{**plan.__dict__, "budget": plan.peak + GiB // 2
                                    - gen.placement.sizes().dit.total // 2, "experts": "swap"}))
    base = _latents(gen, _settings())
    assert gen._parts.experts.mode == "swap" and gen._parts.experts.active == experts_mod.LOW
    gen.set_loras([(expert_loras["high"], 1.0)], [(expert_loras["low"], 0.5)])
    assert (_latents(gen, _settings()) - want_with_loras).abs().max().item() <= 1e-3
    assert gen._parts.experts.mode == "swap"
    gen.set_loras([])
    assert torch.equal(_latents(gen, _settings()), base)


def test_loras_low_needs_two_experts(a14b_set, expert_loras):
    c = a14b_set["comfy_fp32"]
    one = dict(text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    needle = (r"loras_low \(CLI: --lora-low\): only a two-expert model \(Wan2.2 A14B, loaded with low_noise_model\) "
              r"has a low-noise expert; 'wan2.2_t2v_high_noise_tiny.safetensors' has one DiT. Give its LoRAs in "
              r"loras \(CLI: --lora\).")
    with pytest.raises(FastVideoError, match=needle):
        VideoGenerator.from_pretrained(c["model"], loras_low=[(expert_loras["low"], 1.0)], **one)
    gen = VideoGenerator.from_pretrained(c["model"], **one)
    with pytest.raises(FastVideoError, match=needle):
        gen.with_loras([], [(expert_loras["low"], 1.0)])
    with pytest.raises(FastVideoError, match=needle):
        gen.set_loras([(expert_loras["high"], 1.0)], [(expert_loras["low"], 1.0)])
    assert gen.loras == () and gen.loras_low == ()  # a refused change changes nothing
    with pytest.raises(FastVideoError, match=r"loras_low\[0\]: the strength must be a finite number"):
        _comfy(a14b_set, loras_low=[(expert_loras["low"], float("nan"))])


@pytest.mark.parametrize("name, expert", [
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors", "high"),
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16.safetensors", "low"),
    ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors", "high"),
    ("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", "low"),
    ("Wan22_A14B_T2V_LOW_Lightning_4steps_lora_250928_rank128_fp16.safetensors", "low"),
    ("Seko-V1.1/high_noise_model.safetensors", "high"),
    ("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", None),
    ("highlights_lowkey_style.safetensors", None),  # words, not the markers
    ("high_and_low.safetensors", None),  # names both: no guess
])
def test_expert_of_a_lora_file_name(name, expert):
    from fastvideo_nodes.loading.lora import expert_of
    assert expert_of(name) == expert


def test_lora_node_puts_each_file_on_its_expert(a14b_set, expert_loras, tmp_path):
    import os
    import shutil
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    node = fv.FastVideoLoRA()
    spec = fv.FastVideoLoRA.INPUT_TYPES()
    assert spec["optional"]["expert"][0] == ["auto", "high", "low", "both"]
    assert spec["optional"]["expert"][1]["default"] == "auto"
    high, low = expert_loras["high"], expert_loras["low"]  # named …_HIGH / …_LOW
    plain = shutil.copy(high, tmp_path / "style.safetensors")
    model = _comfy(a14b_set)
    (one,) = node.apply(model, high, 1.0)  # auto: the name says HIGH
    (two,) = node.apply(one, low, 0.5)
    assert (two.loras, two.loras_low) == (((high, 1.0),), ((low, 0.5),)) and model.loras == model.loras_low == ()
    (both,) = node.apply(two, str(plain), 0.25)  # no marker in the name: both experts
    assert both.loras[-1] == both.loras_low[-1] == (str(plain), 0.25)
    (forced,) = node.apply(model, high, 1.0, expert="low")
    assert forced.loras == () and forced.loras_low == ((high, 1.0),)
    assert two._parts is model._parts  # the same loaded weights
    c = a14b_set["comfy_fp32"]
    single = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    (on_one,) = node.apply(single, low, 1.0)  # one DiT: auto and both go to it
    assert on_one.loras == ((low, 1.0),) and on_one.loras_low == ()
    with pytest.raises(FastVideoError, match="expert low: this model has one DiT .* Set expert to auto, high or both"):
        node.apply(single, low, 1.0, expert="low")
    with pytest.raises(FastVideoError, match="expert must be one of auto, high, low, both"):
        node.apply(model, low, 1.0, expert="middle")


def test_published_defaults():
    assert experts_mod.T2V_A14B.boundary == 0.875 and experts_mod.I2V_A14B.boundary == 0.9
    assert (experts_mod.T2V_A14B.guidance_high, experts_mod.T2V_A14B.guidance_low) == (4.0, 3.0)


# ----------------------------------------------------------------------------- CLI and node faces


def test_cli_flags_reach_the_two_experts(a14b_set, tmp_path):
    """--low-noise-model, --boundary and --guidance-scale-low give the API's latents."""
    from safetensors.torch import load_file

    from fastvideo_nodes.cli import main as cli_main
    c = a14b_set["comfy_fp32"]
    lat = str(tmp_path / "l.safetensors")
    code = cli_main(["generate", "--model", c["model"], "--low-noise-model", c["low_noise_model"],
                     "--text-encoder", c["text_encoder"], "--vae", c["vae"], "--prompt", PROMPT,
                     "--negative-prompt", NEGATIVE, "--device", "cpu", "--precision", "fp32", "--height", "32",
                     "--width", "48", "--num-frames", "5", "--steps", str(STEPS), "--seed", "3",
                     "--boundary", "0.9", "--guidance-scale", "4", "--guidance-scale-low", "2",
                     "--output", str(tmp_path / "o.mp4"), "--latents-out", lat])
    assert code == 0
    gen = _comfy(a14b_set)
    want = gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE),
                      _settings(boundary=0.9, guidance_scale_low=2.0))
    assert (load_file(lat)["latents"] - want).abs().max().item() <= 1e-4


def test_cli_lora_per_expert(a14b_set, expert_loras, want_with_loras, tmp_path, capsys):
    """--lora goes to the high-noise expert, --lora-low to the low-noise one: the API's latents."""
    from safetensors.torch import load_file

    from fastvideo_nodes.cli import main as cli_main
    c = a14b_set["comfy_fp32"]
    lat = str(tmp_path / "l.safetensors")
    common = ["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
              "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--device", "cpu", "--precision", "fp32",
              "--height", "32", "--width", "48", "--num-frames", "5", "--steps", str(STEPS), "--seed", "3",
              "--lora", expert_loras["high"], "--lora-low", f"{expert_loras['low']}:0.5"]
    code = cli_main(common + ["--low-noise-model", c["low_noise_model"], "--boundary", "0.875",
                              "--guidance-scale", "4", "--guidance-scale-low", "3", "--shift", "12",
                              "--output", str(tmp_path / "o.mp4"), "--latents-out", lat])
    assert code == 0 and "LoRA merge" in capsys.readouterr().out
    got = raw_to_model(load_file(lat)["latents"])
    assert (got - want_with_loras).abs().max().item() <= 1e-3
    code = cli_main(common + ["--output", str(tmp_path / "one.mp4")])  # no --low-noise-model: one DiT
    assert code != 0 and "loras_low (CLI: --lora-low): only a two-expert model" in capsys.readouterr().err


def test_cli_lora_low_errors_name_the_flag(tmp_path):
    from fastvideo_nodes.cli import parse_lora
    with pytest.raises(FastVideoError, match="--lora-low: file not found"):
        parse_lora(str(tmp_path / "missing_LOW.safetensors:0.5"), "--lora-low")
    with pytest.raises(FastVideoError, match="--lora-low 'x.safetensors:abc': the strength after the colon"):
        parse_lora("x.safetensors:abc", "--lora-low")


def test_cli_bad_boundary_is_one_clear_line(a14b_set, tmp_path, capsys):
    from fastvideo_nodes.cli import main as cli_main
    c = a14b_set["comfy_fp32"]
    code = cli_main(["generate", "--model", c["model"], "--low-noise-model", c["low_noise_model"],
                     "--text-encoder", c["text_encoder"], "--vae", c["vae"], "--prompt", PROMPT, "--device", "cpu",
                     "--boundary", "1.2", "--output", str(tmp_path / "o.mp4")])
    assert code != 0 and "boundary must be a number between 0 and 1" in capsys.readouterr().err


def test_generate_video_defaults_are_wan22s(a14b_set, sampling_settings):
    """No guidance, shift or boundary given: 4.0 / 3.0, shift 12, the folder's boundary_ratio."""
    gen = VideoGenerator.from_pretrained(a14b_set["folder"], device="cpu", dtype="fp32")
    s = sampling_settings(gen, PROMPT, num_inference_steps=2, **SIZE)
    assert (s.guidance_scale, s.guidance_scale_low, s.shift, s.boundary) == (4.0, 3.0, 12.0, 0.875)


def test_sampler_node_passes_boundary_and_cfg_low(a14b_set):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    settings = fv.sampling_nodes._settings(48, 32, 5, STEPS, G_HIGH, SHIFT, "unipc", 3, 1.0, 0.0, boundary=0.875,
                                           cfg_low=G_LOW)
    assert (settings.boundary, settings.guidance_scale_low) == (0.875, G_LOW)
    unset = fv.sampling_nodes._settings(48, 32, 5, STEPS, G_HIGH, SHIFT, "unipc", 3, 1.0, 0.0)
    assert (unset.boundary, unset.guidance_scale_low) == (None, None)
    assert "boundary must be a number between 0 and 1" in fv.FastVideoSampler.VALIDATE_INPUTS(boundary=-0.1)


# ----------------------------------------------------------------------------- I2V-A14B

I2V_STEPS, I2V_SHIFT, I2V_G = 6, 5.0, 3.5


@pytest.fixture(scope="module")
def i2v_set(tmp_path_factory):
    from fastvideo_nodes.testing.a14b import build_a14b_set
    return build_a14b_set(str(tmp_path_factory.mktemp("i2v_a14b")), seed=4, i2v=True)


@pytest.fixture(scope="module")
def picture():
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8))


def test_i2v_latents_equal_diffusers_two_experts(i2v_set, picture, monkeypatch):
    """WanImageToVideoPipeline with transformer_2, no image encoder (Wan2.2 I2V has no CLIP branch):
    our folder and our two single files give its latents."""
    from diffusers import WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)  # skips ftfy, as test_i2v
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_set["folder"], torch_dtype=torch.float32)
    assert pipe.image_encoder is None and pipe.config.boundary_ratio == 0.9
    with torch.no_grad():
        want = pipe(image=picture, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=I2V_STEPS,
                    guidance_scale=I2V_G, guidance_scale_2=2.5, generator=torch.Generator("cpu").manual_seed(5),
                    output_type="latent", **SIZE).frames
    settings = SamplingSettings(steps=I2V_STEPS, shift=I2V_SHIFT, guidance_scale=I2V_G, guidance_scale_low=2.5,
                                seed=5, **SIZE)
    which = experts_mod.expert_per_step(make_scheduler("unipc", I2V_STEPS, I2V_SHIFT).timesteps, 0.9)
    assert 0 < which.count(experts_mod.HIGH) < I2V_STEPS
    c = i2v_set["comfy_fp32"]
    for gen in (VideoGenerator.from_pretrained(i2v_set["folder"], device="cpu", dtype="fp32"),
                VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                               text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                               dtype="fp32")):
        encoded = gen.encode_image(picture, settings)
        assert encoded[1] is None and encoded[0].shape[1] == 20  # mask 4 + image latent 16, no CLIP tokens
        got = raw_to_model(gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), settings,
                                      image_condition=encoded))
        err = (got - want).abs().max().item()
        print(f"I2V-A14B: max abs err {err:.2e}")
        assert err <= 1e-3


def test_sampler_node_runs_i2v_a14b_with_an_image(i2v_set, picture):
    """What the wan2.2_i2v_A14B workflow does: a native IMAGE batch into the sampler of a two-expert
    I2V model gives the API's latents."""
    import os
    import sys

    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    c = i2v_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                         text_encoder=c["text_encoder"], vae=c["vae"], device="cpu", dtype="fp32")
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]  # ComfyUI IMAGE [1,H,W,3]
    pos, neg = gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE)
    (latent,) = fv.FastVideoSampler().sample(model=gen, positive=[[pos, {}]], negative=[[neg, {}]], width=48,
                                             height=32, num_frames=5, steps=I2V_STEPS, cfg=I2V_G, shift=I2V_SHIFT,
                                             scheduler="unipc", seed=5, cfg_gate=1.0, teacache_threshold=0.0,
                                             image=image, boundary=0.9, cfg_low=2.5)
    settings = SamplingSettings(steps=I2V_STEPS, shift=I2V_SHIFT, guidance_scale=I2V_G, guidance_scale_low=2.5,
                                boundary=0.9, seed=5, **SIZE)
    want = gen.sample(pos, neg, settings, image_condition=gen.encode_image(image[0], settings))
    assert torch.equal(latent["samples"], want)


def test_i2v_a14b_needs_an_image_and_has_its_defaults(i2v_set, sampling_settings):
    gen = VideoGenerator.from_pretrained(i2v_set["folder"], device="cpu", dtype="fp32")
    with pytest.raises(FastVideoError, match="this is an image-to-video model; give the start image"):
        gen.generate_video(PROMPT, num_inference_steps=2, **SIZE)
    s = sampling_settings(gen, PROMPT, image=torch.zeros(32, 48, 3), num_inference_steps=2, **SIZE)
    assert (s.guidance_scale, s.guidance_scale_low, s.shift, s.boundary) == (3.5, 3.5, 5.0, 0.9)


# ----------------------------------------------------------------------------- on a GPU (the lead runs these)


def _cuda_placements(a14b_set):
    """(mode, generator) on CUDA for each experts placement: both resident; streamed (a budget that
    streams all); swapped (the tiny experts both fit in 2 GiB, so the plan is squeezed to room for
    one). Each generator is closed after its turn."""
    from fastvideo_nodes.memory.planner import GiB
    c = a14b_set["comfy_fp32"]
    for mode, kw in (("resident", {}), ("stream", {"gpu_memory_gb": 1e-6}), ("swap", {"gpu_memory_gb": 2.0})):
        gen = VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                             text_encoder=c["text_encoder"], vae=c["vae"], device="cuda",
                                             dtype="fp32", attention_backend="TORCH_SDPA", **kw)
        gen.load(**SIZE)
        if mode == "swap":
            plan = gen.memory_plan
            gen.placement.replace(type(plan)(**{**plan.__dict__, "experts": "swap",
                                            "budget": plan.peak + GiB // 2 - gen.placement.sizes().dit.total // 2}))
        yield mode, gen
        gen.close()


@pytest.mark.gpu
def test_cuda_placements_equal_cpu(a14b_set):
    """Both resident, swapped from pinned memory, and streamed: the CPU's latents on CUDA (fp32)."""
    cpu = _latents(_comfy(a14b_set), _settings(boundary=0.875))
    modes = {}
    for mode, gen in _cuda_placements(a14b_set):
        got = _latents(gen, _settings(boundary=0.875)).cpu()
        modes[mode] = gen._parts.experts.mode
        assert (got - cpu).abs().max().item() < 1e-2, mode
        if mode == "swap":
            assert gen._parts.experts.homes[experts_mod.HIGH].device.type == "cpu"
            assert all(p.device.type == "cpu" for p in gen.dit.parameters())  # the idle expert left the GPU
    assert modes == {"resident": "resident", "stream": "stream", "swap": "swap"}


@pytest.mark.gpu
def test_cuda_lora_per_expert_in_every_placement(a14b_set, expert_loras, want_with_loras, monkeypatch):
    """A LoRA per expert on CUDA with both experts resident, swapped and streamed: diffusers' latents
    with the LoRAs merged by hand; a change after a run (the low expert active) and removal hold.
    The placements run the same math on one device, so they must agree tightly with each other (a
    block left unmerged shows as ~1e-2); against the CPU reference the tolerance is looser."""
    # cuDNN's default TF32 convolutions alone move fp32 latents by ~1e-2 here, which hid whether a
    # difference was numerics or a block without its LoRA.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    loras = dict(loras=[(expert_loras["high"], 1.0)], loras_low=[(expert_loras["low"], 0.5)])
    cpu = _comfy(a14b_set)
    base = _latents(cpu, _settings()).cpu()
    # One set of prompt embeddings for every placement: the streamed plan encodes on the CPU and the
    # resident one on the GPU, and that rounding alone would part their latents by ~1e-2.
    prompts = cpu.encode_prompt(PROMPT), cpu.encode_prompt(NEGATIVE)
    latents = lambda gen: raw_to_model(gen.sample(*prompts, _settings())).cpu()
    runs = {}
    for mode, gen in _cuda_placements(a14b_set):
        plain = latents(gen)
        assert gen._parts.experts.mode == mode
        gen.set_loras(**loras)  # after a run: the low expert is the active one
        merged = latents(gen)
        gen.set_loras([])
        runs[mode] = (plain, merged, latents(gen))
    # Every figure first, then the checks: a failure shows the whole table (plain, merged, removed).
    table = {}
    for mode, (plain, merged, removed) in runs.items():
        table[mode] = {"vs reference": [(plain - base).abs().max().item(),
                                        (merged - want_with_loras).abs().max().item(),
                                        (removed - base).abs().max().item()],
                       "vs resident": [(a - b).abs().max().item() for a, b in zip(runs[mode], runs["resident"])]}
    for mode, row in table.items():
        assert max(row["vs reference"]) < 1e-2, (mode, table)
        assert max(row["vs resident"]) < 1e-4, (mode, table)


def _block_runs(gen):
    """Per expert, the steps at which its blocks ran (TeaCache skips them)."""
    runs = {"high": [], "low": []}
    for name, dit in (("high", gen.dit), ("low", gen.dit_low)):
        dit.blocks[0].register_forward_pre_hook(lambda m, a, _n=name: runs[_n].append(1))
    return runs


def test_cfg_gate_applies_to_each_experts_span(a14b_set):
    """cfg_gate 0.5: each expert runs the unconditional pass on the first half of its own steps, so
    the low-noise expert has a guidance direction of its own (not the high-noise one's)."""
    gen = _comfy(a14b_set)
    which = experts_mod.expert_per_step(make_scheduler("unipc", STEPS, SHIFT).timesteps, 0.875)
    high, low = which.count(0), which.count(1)
    runs = _block_runs(gen)
    from fastvideo_nodes.pipeline.sampler import SamplingStats
    stats = SamplingStats()
    gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), _settings(boundary=0.875, cfg_gate=0.5),
               stats=stats)
    import math
    assert stats.uncond_forwards == math.ceil(high * 0.5) + math.ceil(low * 0.5)
    assert len(runs["high"]) == high + math.ceil(high * 0.5) and len(runs["low"]) == low + math.ceil(low * 0.5)


def test_teacache_starts_afresh_at_the_switch(a14b_set):
    """A threshold nothing reaches: the blocks run only on forced steps (the first and last) and on the
    low-noise expert's first step, where its cache is new (the high expert's residual does not apply)."""
    gen = _comfy(a14b_set)
    which = experts_mod.expert_per_step(make_scheduler("unipc", STEPS, SHIFT).timesteps, 0.875)
    assert which.count(1) >= 2  # the switch step is not the last step
    runs = _block_runs(gen)
    from fastvideo_nodes.pipeline.sampler import SamplingStats
    stats = SamplingStats()
    gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE),
               _settings(boundary=0.875, teacache_threshold=100.0, teacache_coefficients=[1.0, 0.0]), stats=stats)
    assert len(runs["high"]) == 2 and len(runs["low"]) == 4  # (cond + uncond) × steps run
    assert stats.teacache_skipped == 2 * (STEPS - 3)
