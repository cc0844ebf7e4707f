"""Every bad input is one clear FastVideoError before any work; videos never destroy existing files;
calls on one generator run one at a time; node file names stay inside ComfyUI's model folders."""
import math
import os
import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.inputs import parse_gpu_ids
from fastvideo_nodes.pipeline.sampler import MAX_SEED, SamplingSettings, initial_noise
from fastvideo_nodes.pipeline.size_check import check_fits, estimate_bytes

SIZE = dict(height=32, width=48, num_frames=5)


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("set")), seed=0)


def generator(model_set, **kw):
    c = model_set["comfy_fp32"]
    return VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                          **kw)


def untouched(gen) -> bool:
    """Nothing loaded: the error came before any work."""
    return gen._parts.dit is None and gen._parts.text_encoder is None and gen._parts.vae is None


# -- sampling settings


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=10**7), "steps must be a whole number from 1 to 1000, got 10000000"),
    (dict(steps=2.0), "steps must be a whole number"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    (dict(shift=math.nan), "shift must be a finite number"),
    (dict(shift=-math.inf), "shift must be a finite number"),
    (dict(cfg_gate=math.nan), "cfg_gate must be a finite number"),
    (dict(teacache_threshold=math.inf), "teacache_threshold must be a finite number"),
    (dict(guidance_scale="5"), "guidance_scale must be a finite number, got '5'"),
    (dict(seed=2**64), "seed must be a whole number from 0 to 2\\^64-1"),
    (dict(seed=-1), "seed must be a whole number from 0 to 2\\^64-1 .*got -1"),
    (dict(seed=1.5), "seed must be a whole number .*got 1.5"),
    (dict(seed=True), "seed must be a whole number .*got True"),
    (dict(height=True), "height must be a positive multiple of 16"),
    (dict(height=math.nan), "height must be a positive multiple of 16, got nan"),
    (dict(num_frames=math.inf), "num_frames must be 4n\\+1"),
])
def test_bad_settings_are_one_clear_error(kw, needle):
    with pytest.raises(FastVideoError, match=needle) as e:
        SamplingSettings(**kw).validate()
    assert "\n" not in str(e.value)


def test_the_whole_comfyui_seed_range_is_accepted():
    import numpy as np
    for seed in (0, MAX_SEED, np.int64(7)):
        initial_noise(SamplingSettings(**SIZE, seed=seed).validate())
    a = initial_noise(SamplingSettings(**SIZE, seed=np.int64(7)))
    assert torch.equal(a, initial_noise(SamplingSettings(**SIZE, seed=7)))


# -- memory estimate


def test_estimate_never_refuses_a_run_known_to_fit():
    """Wan 1.3B at 480p, 81 frames, bf16 runs on 8 GB cards next to its 2.8 GB of weights, so the
    size-dependent estimate must stay well under 5 GB (the estimate is meant to be on the low side)."""
    s = SamplingSettings(height=480, width=832, num_frames=81)
    need = estimate_bytes(s, dim=1536, ffn_dim=8960, dtype=torch.bfloat16)
    assert 0.5 * 2**30 < need < 5 * 2**30
    # sequence parallel divides the DiT's share
    big = SamplingSettings(height=720, width=1280, num_frames=81)
    assert estimate_bytes(big, 5120, 13824, torch.bfloat16, num_gpus=4) < estimate_bytes(big, 5120, 13824,
                                                                                         torch.bfloat16)


def test_too_big_names_the_largest_size_that_fits():
    dims = dict(dim=1536, ffn_dim=8960, dtype=torch.bfloat16)
    s = SamplingSettings(height=480, width=832, num_frames=81)
    budget = estimate_bytes(SamplingSettings(height=480, width=832, num_frames=41), **dims)
    check_fits(SamplingSettings(height=480, width=832, num_frames=41), **dims, device=torch.device("cuda"),
               available=budget)  # exactly at the budget: fine
    with pytest.raises(FastVideoError) as e:
        check_fits(s, **dims, device=torch.device("cuda"), available=budget)
    msg = str(e.value)
    assert msg.startswith("height/width/num_frames 832x480x81 needs about") and "free GPU memory" in msg
    assert "the largest that fits: 41 frames at 832x480 or about " in msg
    w, h = (int(v) for v in msg.split("or about ")[1].split(" at ")[0].split("x"))
    assert estimate_bytes(SamplingSettings(height=h, width=w, num_frames=81), **dims) <= budget
    w_next = round(832 * (h + 16) / 480 / 16) * 16  # the next size up at the same aspect ratio
    assert estimate_bytes(SamplingSettings(height=h + 16, width=w_next, num_frames=81), **dims) > budget


@pytest.mark.parametrize("size", [dict(height=100000, width=832, num_frames=5),
                                  dict(height=480, width=100000, num_frames=1),
                                  dict(height=480, width=832, num_frames=100001)])
def test_sizes_no_machine_holds_fail_before_any_work(model_set, size, monkeypatch):
    from fastvideo_nodes.pipeline import size_check
    assert size_check.available_bytes(torch.device("cpu")) > 2**28  # the real query answers
    monkeypatch.setattr(size_check, "available_bytes", lambda device: 256 * 2**30)  # a big workstation
    gen = generator(model_set)
    with pytest.raises(FastVideoError, match="needs about .* GB .* 256.0 GB is available host RAM; the largest th"):
        gen.generate_video("x", num_inference_steps=2, **size)
    assert untouched(gen)


# -- generate_video inputs, all checked before any work


@pytest.mark.parametrize("kw,needle", [
    (dict(prompt="a fox \udcff"), "prompt is not valid UTF-8 text \\(character 6: '\\\\udcff'\\)"),
    (dict(negative_prompt="\ud800 blurry"), "negative_prompt is not valid UTF-8"),
    (dict(prompt=None), "prompt must be text, got NoneType"),
    (dict(fps=0), "fps must be a whole number from 1 to 240"),
    (dict(fps=12.5), "fps must be a whole number .*got 12.5"),
    (dict(output_path="out.txt"), "output_path: '.*out.txt' is not a video file name; end it in one of .mp4, "
                                  ".mov, .mkv, .webm \\(e.g. .*out.mp4\\)"),
    (dict(num_inference_steps=10**7), "steps must be a whole number from 1 to 1000"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
    (dict(seed=2**70), "seed must be a whole number from 0 to 2\\^64-1"),
])
def test_generate_video_bad_input(model_set, tmp_path, kw, needle):
    gen = generator(model_set)
    kw = {"prompt": "x", **kw, "output_path": str(tmp_path / kw.get("output_path", "v.mp4"))}
    with pytest.raises(FastVideoError, match=needle):
        gen.generate_video(kw.pop("prompt"), num_inference_steps=kw.pop("num_inference_steps", 2), **SIZE, **kw)
    assert untouched(gen) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("device,needle", [
    ("quantum", "device 'quantum' is not a device this runs on; use cpu, cuda or cuda:N"),
    ("meta", "device 'meta' is not a device this runs on"),
    ("cuda:x", "device 'cuda:x' is not a device"),
])
def test_bad_device_names_device_and_valid_forms(model_set, device, needle):
    c = model_set["comfy"]
    with pytest.raises(FastVideoError, match=needle):
        VideoGenerator.from_pretrained(c["model"], device=device)
    with pytest.raises(FastVideoError, match="text_encoder_device " + needle.split(" ", 1)[1]):
        VideoGenerator.from_pretrained(c["model"], device="cpu", text_encoder_device=device)


@pytest.mark.parametrize("ids,want", [("", None), ("0, 2", [0, 2]), ("1,", [1]), ([3, 1], [3, 1]), (None, None)])
def test_gpu_ids_forms(ids, want):
    assert parse_gpu_ids(ids) == want


@pytest.mark.parametrize("ids,needle", [("a,b", "gpu_ids must be comma-separated GPU indices such as 0,1"),
                                        ("0;1", "comma-separated"), ("-1", "comma-separated"), ("²", "comma-separated"),
                                        ([0, 1.5], "gpu_ids must be a list of GPU indices"),
                                        (7, "gpu_ids must be a list"), ("1,1", "gpu_ids names a GPU twice")])
def test_bad_gpu_ids(model_set, ids, needle):
    with pytest.raises(FastVideoError, match=needle):
        parse_gpu_ids(ids)
    gen = generator(model_set, num_gpus=2, gpu_ids=ids)  # the API: refused before any work
    with pytest.raises(FastVideoError, match=needle):
        gen.generate_video("x", num_inference_steps=2, **SIZE)
    assert untouched(gen)
    with pytest.raises(FastVideoError, match=needle):
        generator(model_set).with_parallel(2, ids)


def test_parallel_node_refuses_bad_gpu_ids(model_set):
    from nodes.model_nodes import FastVideoParallelWorkers
    with pytest.raises(FastVideoError, match="gpu_ids must be comma-separated GPU indices.*got 'zero'"):
        FastVideoParallelWorkers().launch(generator(model_set), 2, "zero")


# -- non-finite latents


def nan_model_file(model_set, tmp_path) -> str:
    """The tiny DiT file with one weight broken to NaN, as a damaged download would be."""
    from safetensors.torch import load_file, save_file
    sd = load_file(model_set["comfy_fp32"]["model"])
    key = next(k for k in sd if k.endswith("ffn.0.weight"))
    sd[key][0, 0] = math.nan
    path = str(tmp_path / "broken.safetensors")
    save_file(sd, path)
    return path


def test_non_finite_latents_are_an_error_and_no_video(model_set, tmp_path):
    c = model_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(nan_model_file(model_set, tmp_path), text_encoder=c["text_encoder"],
                                         vae=c["vae"], device="cpu")
    out = tmp_path / "v.mp4"
    with pytest.raises(FastVideoError, match="sampling produced non-finite latents .* Likely causes: fp16 overflow"):
        gen.generate_video("x", num_inference_steps=2, output_path=str(out), **SIZE)
    assert not out.exists()
    with pytest.raises(FastVideoError, match="non-finite latents"):
        gen.decode(torch.full((1, 16, 2, 4, 6), math.inf))


def test_cli_non_finite_latents_exit_code(model_set, tmp_path, capsys):
    from fastvideo_nodes.cli import main
    c = model_set["comfy_fp32"]
    out = tmp_path / "v.mp4"
    code = main(["generate", "--model", nan_model_file(model_set, tmp_path), "--text-encoder", c["text_encoder"],
                 "--vae", c["vae"], "--prompt", "x", "--device", "cpu", "--height", "32", "--width", "48",
                 "--num-frames", "5", "--steps", "2", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "error: sampling produced non-finite latents" in err and not out.exists()


# -- writing videos


@pytest.fixture(scope="module")
def frames():
    return torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov", ".webm"])
def test_every_listed_container_is_written(tmp_path, frames, ext):
    from fastvideo_nodes.video import read_video_info, write_video
    path = str(tmp_path / f"v{ext}")
    write_video(frames, path, fps=8)
    assert read_video_info(path) == (5, 32, 48) and os.listdir(tmp_path) == [f"v{ext}"]


def test_existing_file_is_refused_unless_overwrite(tmp_path, frames):
    from fastvideo_nodes.video import read_video_info, write_video
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old video")
    with pytest.raises(FastVideoError, match="already exists; .*--overwrite, Python: overwrite=True"):
        write_video(frames, str(path))
    assert path.read_bytes() == b"old video"
    write_video(frames, str(path), overwrite=True)
    assert read_video_info(str(path)) == (5, 32, 48)


def test_a_failed_write_keeps_the_old_file(tmp_path, frames, monkeypatch):
    """A full disk mid-write: the old video stays, and no partial file is left behind."""
    import av

    from fastvideo_nodes.video import write_video
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old video")
    real, calls = av.VideoFrame.from_ndarray, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(OSError, match="No space left"):
        write_video(frames, str(path), overwrite=True)
    assert path.read_bytes() == b"old video" and os.listdir(tmp_path) == ["v.mp4"]


def test_output_path_checks(tmp_path):
    from fastvideo_nodes.video import check_output_path
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(FastVideoError, match="is a folder; give a file name"):
        check_output_path(str(tmp_path / "d.mp4"))
    with pytest.raises(FastVideoError, match="cannot be created: .*file' is a file, not a folder"):
        check_output_path(str(tmp_path / "file" / "v.mp4"))
    assert check_output_path(str(tmp_path / "new" / "deeper" / "v.MP4")).endswith("v.MP4")


# -- one generator, two threads


def test_two_threads_on_one_generator_get_the_sequential_results(model_set):
    gen = generator(model_set)
    other = gen.with_attention_backend(None)  # shares the loaded models, so the lock too
    kw = dict(num_inference_steps=2, **SIZE)
    want = [gen.generate_video("a red fox", seed=s, **kw).latents for s in (1, 2)]
    got = [None, None]
    errors = []

    def run(i, g):
        try:
            got[i] = g.generate_video("a red fox", seed=i + 1, **kw).latents
        except Exception as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=run, args=(0, gen)), threading.Thread(target=run, args=(1, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and not torch.equal(want[0], want[1])
    assert gen._parts.lock is other._parts.lock is gen.with_parallel(2)._parts.lock


# -- CLI


def cli(model_set, *flags):
    from fastvideo_nodes.cli import main
    c = model_set["comfy"]
    return main(["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
                 "--device", "cpu", "--height", "32", "--width", "48", "--num-frames", "5", "--steps", "2", *flags])


def test_cli_refuses_an_existing_output_until_overwrite(model_set, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"keep me")
    assert cli(model_set, "--prompt", "x", "--output", str(out)) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    lat = tmp_path / "l.safetensors"
    lat.write_bytes(b"keep")
    assert cli(model_set, "--prompt", "x", "--output", str(tmp_path / "n.mp4"), "--latents-out", str(lat)) == 2
    assert "--latents-out: " in capsys.readouterr().err and not (tmp_path / "n.mp4").exists()
    assert cli(model_set, "--prompt", "x", "--output", str(out), "--latents-out", str(lat), "--overwrite") == 0
    from safetensors.torch import load_file

    from fastvideo_nodes.video import read_video_info
    assert read_video_info(str(out)) == (5, 32, 48) and load_file(str(lat))["latents"].shape == (1, 16, 2, 4, 6)
    assert sorted(os.listdir(tmp_path)) == ["l.safetensors", "v.mp4"]


def test_cli_error_starts_on_its_own_line(model_set, tmp_path, capsys, monkeypatch):
    """A failure mid-sampling: the progress line is ended before `error:`."""
    def failing_sample(self, positive, negative, settings, callback=None, **_):
        callback(1, 2, None)
        raise FastVideoError("boom")

    monkeypatch.setattr(VideoGenerator, "sample", failing_sample)
    assert cli(model_set, "--prompt", "x", "--output", str(tmp_path / "v.mp4"), "--guidance-scale", "1") == 2
    err = capsys.readouterr().err
    assert "1/2" in err and "\nerror: boom\n" in err and err.splitlines()[-1] == "error: boom"


def test_cli_sigterm_is_a_clean_exit_143(model_set, tmp_path):
    """SIGTERM mid-sampling: exit 143, one line, the `finally: gen.close()` ran, no file left behind."""
    import signal
    c = model_set["comfy"]
    script = textwrap.dedent(f"""
        import sys, time
        from fastvideo_nodes.pipeline.generator import VideoGenerator
        from fastvideo_nodes import cli
        close = VideoGenerator.close
        def closing(self):
            print("closed", flush=True)
            close(self)
        def slow_sample(self, *a, callback=None, **k):
            print("sampling", flush=True)
            time.sleep(60)
        VideoGenerator.close, VideoGenerator.sample = closing, slow_sample
        sys.exit(cli.main(["generate", "--model", {c['model']!r}, "--text-encoder", {c['text_encoder']!r},
                           "--vae", {c['vae']!r}, "--prompt", "x", "--device", "cpu", "--height", "32",
                           "--width", "48", "--num-frames", "5", "--output", {str(tmp_path / 'v.mp4')!r}]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")))
    try:
        assert p.stdout.readline() == "sampling\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143 and out == "closed\n", (out, err)
    assert err.strip() == "terminated (SIGTERM)" and os.listdir(tmp_path) == []


# -- ComfyUI nodes


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """A fake ComfyUI `folder_paths` over two model roots, as extra_model_paths.yaml gives."""
    roots = {"diffusion_models": [tmp_path / "models" / "diffusion_models", tmp_path / "extra" / "dm"],
             "text_encoders": [tmp_path / "models" / "text_encoders"], "vae": [tmp_path / "models" / "vae"]}
    for paths in roots.values():
        for r in paths:
            r.mkdir(parents=True)
    (roots["diffusion_models"][1] / "sub").mkdir()
    (roots["diffusion_models"][1] / "sub" / "wan.safetensors").write_bytes(b"x")
    (roots["diffusion_models"][0] / "Wan-Diffusers" / "transformer").mkdir(parents=True)
    (roots["vae"][0] / "wan_2.1_vae.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "secret.safetensors").write_bytes(b"x")
    fake = types.SimpleNamespace(get_folder_paths=lambda kind: [str(r) for r in roots.get(kind, [])],
                                 get_filename_list=lambda kind: [])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return roots


def test_full_path_resolves_names_inside_the_model_folders(comfy_folders):
    from nodes.comfy_api import full_path
    dm = comfy_folders["diffusion_models"]
    assert full_path("diffusion_models", "sub/wan.safetensors") == str(dm[1] / "sub" / "wan.safetensors")
    assert full_path("diffusion_models", "Wan-Diffusers") == str(dm[0] / "Wan-Diffusers")
    assert full_path("vae", "wan_2.1_vae.safetensors") == str(comfy_folders["vae"][0] / "wan_2.1_vae.safetensors")
    assert full_path("vae", "sub/../wan_2.1_vae.safetensors").endswith("vae/wan_2.1_vae.safetensors")


@pytest.mark.parametrize("kind,name,needle", [
    ("diffusion_models", "/etc/passwd", "model: '/etc/passwd' must be a name inside ComfyUI's diffusion_models "
                                        "folder .*not an absolute path"),
    ("vae", "../secret.safetensors", "vae: '../secret.safetensors' leaves ComfyUI's vae folder"),
    ("text_encoders", "../../../../etc/passwd", "text_encoder: .* leaves ComfyUI's text_encoders folder"),
    ("text_encoders", "umt5.safetensors", "text_encoder: 'umt5.safetensors' is not in ComfyUI's text_encoders "
                                          "folder .*put the file there"),
])
def test_full_path_refuses_names_outside_the_model_folders(comfy_folders, kind, name, needle):
    from nodes.comfy_api import full_path
    with pytest.raises(FastVideoError, match=needle):
        full_path(kind, name)


def test_load_node_refuses_an_absolute_path(comfy_folders):
    from nodes.model_nodes import LoadFastVideoModel
    with pytest.raises(FastVideoError, match="model: '/etc/passwd' must be a name inside"):
        LoadFastVideoModel().load("/etc/passwd", "(from diffusers folder)", "(from diffusers folder)", "bf16",
                                  "as stored")


def test_outside_comfyui_names_are_plain_paths(monkeypatch):
    from nodes.comfy_api import full_path
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # import folder_paths → ImportError
    assert full_path("vae", "/some/where/vae.safetensors") == "/some/where/vae.safetensors"


def test_node_validate_inputs_use_the_same_checks():
    from nodes.sampling_nodes import EncodePrompt, FastVideoSampler
    assert FastVideoSampler.VALIDATE_INPUTS() is True
    for kw, needle in [(dict(seed=-1), "seed must be a whole number"), (dict(cfg=math.nan), "guidance_scale must"),
                       (dict(shift=math.inf), "shift must be a finite"), (dict(steps=5000), "from 1 to 1000")]:
        assert needle in FastVideoSampler.VALIDATE_INPUTS(**kw)
    assert EncodePrompt.VALIDATE_INPUTS(prompt="ok", negative_prompt="ok") is True
    assert EncodePrompt.VALIDATE_INPUTS(prompt="ok", negative_prompt="\udcff").startswith(
        "negative_prompt is not valid UTF-8")
    with pytest.raises(FastVideoError, match="prompt is not valid UTF-8"):
        EncodePrompt().encode(None, "\udcff", "")


def test_decode_node_refuses_what_is_not_a_latent():
    from nodes.sampling_nodes import DecodeVAE
    for samples in ({"other": 1}, torch.zeros(1, 16, 1, 2, 2), {"samples": torch.zeros(1, 4, 2, 2)}):
        with pytest.raises(FastVideoError, match="samples: expected a"):
            DecodeVAE().decode(None, samples)
