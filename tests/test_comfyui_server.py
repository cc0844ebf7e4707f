"""The pack inside a real ComfyUI server (headless, CPU), driven like a user drives it.

Runs when COMFYUI_PATH names a ComfyUI checkout (COMFYUI_PYTHON: the Python that has ComfyUI's
requirements; default this one; COMFY_CLI: the comfy-cli executable, default `comfy` next to it).
Skipped otherwise, e.g. in CI.

Note on the mixed workflow: ComfyUI's CLIPLoader (type wan) always builds the full-size UMT5-XXL,
so a tiny test encoder cannot load there. In this test that workflow's text nodes are replaced by
our FastVideoEncodePrompt, whose outputs are native CONDITIONING; the native VAELoader → VAEDecode part is
kept (with a random full-width VAE, since ComfyUI's Wan VAE is fixed at width 96).
"""
import copy
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.environ.get("COMFYUI_PYTHON", sys.executable)
CLI = os.environ.get("COMFY_CLI", os.path.join(os.path.dirname(PY), "comfy"))
SMALL = {"width": 48, "height": 32, "num_frames": 5, "steps": 2}
SMALL_22 = {"width": 96, "height": 64, "num_frames": 5, "steps": 2}  # Wan2.2 TI2V-5B: multiples of 32
FASTWAN_FOLDER = "FastWan2.1-T2V-1.3B-Diffusers"


def http(port, path, data=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(data).encode() if data is not None
                                 else None, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original
    from fastvideo_nodes.testing.fastwan import build_fastwan_folder
    from fastvideo_nodes.testing.folders import build_model_set
    from fastvideo_nodes.testing.i2v import build_i2v_model_set
    from fastvideo_nodes.testing.lora import save_random_lora
    from fastvideo_nodes.testing.text_encoder import random_umt5, save_comfy
    from fastvideo_nodes.testing.vae import random_vae
    from fastvideo_nodes.testing.vae import save_original as save_vae

    base = tmp_path_factory.mktemp("comfy")
    files = build_model_set(str(base / "set"), seed=7)["comfy"]
    i2v = build_i2v_model_set(str(base / "i2v"), seed=7)["comfy"]  # its text encoder and VAE: the T2V set's
    models = {"diffusion_models": files["model"], "text_encoders": files["text_encoder"]}
    for kind, path in [*models.items(), ("diffusion_models", i2v["model"]), ("clip_vision", i2v["image_encoder"])]:
        os.makedirs(base / "models" / kind, exist_ok=True)
        shutil.copy(path, base / "models" / kind)
    from PIL import Image
    os.makedirs(base / "input", exist_ok=True)
    Image.effect_noise((48, 32), 64).convert("RGB").save(base / "input" / "start.png")
    os.makedirs(base / "models" / "vae", exist_ok=True)
    save_vae(random_vae(base_dim=96, seed=3).state_dict(),
                  str(base / "models" / "vae" / "wan_vae_w96.safetensors"), dtype=torch.float16)
    save_random_lora(TINY_DIT, str(base / "models" / "loras" / "lora_tiny.safetensors"), seed=5)
    # A DiT that ComfyUI's own Wan loader reads too: it assumes 128-wide heads and 4096-wide text.
    native = replace(TINY_DIT, text_dim=4096)
    save_original(random_dit(native, seed=11).state_dict(),
                  str(base / "models" / "diffusion_models" / "wan2.1_t2v_tiny_native.safetensors"))
    save_comfy(random_umt5(d_model=4096, d_kv=8, d_ff=64, seed=12),
               str(base / "models" / "text_encoders" / "umt5_tiny_4096.safetensors"))
    # A tiny FastWan diffusers folder under the name the FastWan workflow loads.
    shutil.copytree(build_fastwan_folder(str(base / "fastwan_set"), seed=7),
                    base / "models" / "diffusion_models" / FASTWAN_FOLDER)
    # Wan2.2 TI2V-5B: its DiT and 48-channel VAE (the start.png above, resized, is its first frame).
    from fastvideo_nodes.testing.wan22 import build_wan22_set
    wan22 = build_wan22_set(str(base / "set22"), seed=8)["comfy_fp32"]
    shutil.copy(wan22["model"], base / "models" / "diffusion_models")
    shutil.copy(wan22["vae"], base / "models" / "vae")
    # Wan2.2 A14B: its two experts (the T2V set's text encoder and VAE serve them).
    from fastvideo_nodes.testing.a14b import build_a14b_set
    a14b = build_a14b_set(str(base / "a14b"), seed=9)["comfy_fp32"]
    a14b_i2v = build_a14b_set(str(base / "a14b_i2v"), seed=10, i2v=True)["comfy_fp32"]  # 36-channel experts
    for key in ("model", "low_noise_model"):
        shutil.copy(a14b[key], base / "models" / "diffusion_models")
        shutil.copy(a14b_i2v[key], base / "models" / "diffusion_models")
    (base / "extra.yaml").write_text(f"fastvideo_test:\n    base_path: {base}\n"
                                     "    diffusion_models: models/diffusion_models\n"
                                     "    text_encoders: models/text_encoders\n    vae: models/vae\n"
                                     "    loras: models/loras\n    clip_vision: models/clip_vision\n")
    link = os.path.join(COMFY, "custom_nodes", "fastvideo_nodes_under_test")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(ROOT, link)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = base / "output"
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([PY, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--extra-model-paths-config", str(base / "extra.yaml"), "--output-directory", str(out),
                             "--input-directory", str(base / "input"),
                             "--disable-auto-launch"], cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                if http(port, "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start")
        assert proc.poll() is None, open(base / "server.log").read()[-3000:]
        info = http(port, "/object_info")[1]
        assert "FastVideoSampler" in info, open(base / "server.log").read()[-3000:]
        yield dict(port=port, base=base, out=out, info=info, files={
            "model": os.path.basename(files["model"]), "text_encoder": os.path.basename(files["text_encoder"]),
            "vae": "wan_vae_w96.safetensors", "lora": "lora_tiny.safetensors",
            "native_model": "wan2.1_t2v_tiny_native.safetensors", "native_text_encoder": "umt5_tiny_4096.safetensors",
            "i2v_model": os.path.basename(i2v["model"]), "clip_vision": os.path.basename(i2v["image_encoder"]),
            "image": "start.png",
            "model22": os.path.basename(wan22["model"]), "vae22": os.path.basename(wan22["vae"]),
            "a14b_high": os.path.basename(a14b["model"]), "a14b_low": os.path.basename(a14b["low_noise_model"]),
            "a14b_i2v_high": os.path.basename(a14b_i2v["model"]),
            "a14b_i2v_low": os.path.basename(a14b_i2v["low_noise_model"])})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.remove(link)


def test_copy(server, name, prefix):
    """A copy of an example workflow with the tiny files and small sizes filled in."""
    wf = json.load(open(os.path.join(ROOT, "workflows", name)))
    f = server["files"]
    a14b = "A14B" in name  # Wan2.2 A14B: two experts at Wan2.1's latent geometry
    wan22 = "wan2.2" in name and not a14b
    small = SMALL_22 if wan22 else SMALL
    for n in wf["nodes"]:
        w = n["widgets_values"]
        if n["type"] == "LoadFastVideoModel":
            w[0], w[3] = f["model22" if wan22 else "model"], "fp32"
            if name.startswith("fastwan"):  # the folder holds its own text encoder and VAE
                w[0] = FASTWAN_FOLDER
            elif "mixed" not in name:  # the mixed workflow loads only the DiT here
                w[1], w[2] = f["text_encoder"], f["vae22" if wan22 else "vae"]
            if name.startswith("wan2.1_i2v"):  # (not wan2.2_ti2v)
                w[0], w[8] = f["i2v_model"], f["clip_vision"]
            if a14b:
                i2v = "i2v" in name
                w[0], w[9] = f["a14b_i2v_high" if i2v else "a14b_high"], f["a14b_i2v_low" if i2v else "a14b_low"]
        elif n["type"] == "FastVideoSampler":
            w[0], w[1], w[2], w[3] = small["width"], small["height"], small["num_frames"], small["steps"]
        elif n["type"] == "LoadImage":
            w[0] = f["image"]
        elif n["type"] == "FastVideoLoRA":
            w[0] = f["lora"]
        elif n["type"] == "VAELoader":
            w[0] = f["vae"]
        elif n["type"] == "SaveVideo":
            w[0] = prefix
    if "mixed" in name:
        wf = _native_text_to_encode_prompt(wf)
    return wf


test_copy.__test__ = False  # a helper, not a test


def _native_text_to_encode_prompt(wf):
    """Swap CLIPLoader + CLIPTextEncode for our FastVideoEncodePrompt (see the module docstring)."""
    wf = copy.deepcopy(wf)
    ids = {n["type"]: n["id"] for n in wf["nodes"]}
    loader = next(n for n in wf["nodes"] if n["type"] == "LoadFastVideoModel")
    loader["widgets_values"][1] = "umt5_tiny.safetensors"
    texts = [n for n in wf["nodes"] if n["type"] == "CLIPTextEncode"]
    enc_id = max(n["id"] for n in wf["nodes"]) + 1
    enc = {"id": enc_id, "type": "FastVideoEncodePrompt", "pos": [380, 200], "size": [320, 200], "flags": {},
           "order": 0, "mode": 0, "inputs": [{"name": "model", "type": "FASTVIDEO_MODEL", "link": None}],
           "outputs": [{"name": "positive", "type": "CONDITIONING", "links": [], "slot_index": 0},
                       {"name": "negative", "type": "CONDITIONING", "links": [], "slot_index": 1}],
           "properties": {}, "widgets_values": [texts[0]["widgets_values"][0], texts[1]["widgets_values"][0], True]}
    links = []
    next_link = max(l[0] for l in wf["links"]) + 1
    for l in wf["links"]:
        if l[1] == ids["CLIPLoader"]:
            continue
        if l[1] in (texts[0]["id"], texts[1]["id"]):
            l = [l[0], enc_id, 0 if l[1] == texts[0]["id"] else 1] + l[3:]
            enc["outputs"][l[2]]["links"].append(l[0])
        links.append(l)
    links.append([next_link, loader["id"], 0, enc_id, 0, "FASTVIDEO_MODEL"])
    loader["outputs"][0]["links"].append(next_link)
    enc["inputs"][0]["link"] = next_link
    wf["nodes"] = [n for n in wf["nodes"] if n["type"] not in ("CLIPLoader", "CLIPTextEncode")] + [enc]
    wf["links"] = links
    wf["last_node_id"], wf["last_link_id"] = enc_id, next_link
    return wf


def to_api(wf, info):
    """UI format → API format, naming widgets from the server's /object_info (as comfy-cli does)."""
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        spec = info[n["type"]]["input"]
        names = []
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                kind = entry[0]
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    names.append(name)
                    if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("control_after_generate"):
                        names.append(None)
        inputs = {k: v for k, v in zip(names, n["widgets_values"]) if k is not None}
        for i in n["inputs"]:
            if i.get("link") is not None:
                l = links[i["link"]]
                inputs[i["name"]] = [str(l[1]), l[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def wait_done(port, prompt_id, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        hist = http(port, f"/history/{prompt_id}")[1]
        if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("status_str") == "error":
            return hist[prompt_id]
        time.sleep(0.5)
    pytest.fail("prompt did not finish")


def saved_video(out, prefix):
    from fastvideo_nodes.video import read_video_info
    found = sorted(glob.glob(os.path.join(out, prefix + "*")))
    assert found, f"no video saved under {prefix}"
    return read_video_info(found[-1])


@pytest.mark.parametrize("name", ["wan2.1_t2v_1.3B_fastvideo.json", "wan2.1_t2v_1.3B_fastvideo_fast.json",
                                  "wan2.1_t2v_1.3B_mixed_native.json", "wan2.1_t2v_14B_4step_lora.json",
                                  "fastwan2.1_t2v_1.3B_3step.json", "wan2.1_i2v_14B.json",
                                  "wan2.2_ti2v_5B.json", "wan2.2_t2v_A14B.json", "wan2.2_i2v_A14B.json"])
def test_workflow_through_comfy_cli_and_api(server, name, tmp_path):
    stem = name.replace(".json", "")
    small = SMALL_22 if "wan2.2" in name and "A14B" not in name else SMALL
    size = (small["num_frames"], small["height"], small["width"])
    wf = test_copy(server, name, f"cli_{stem}")
    path = tmp_path / name
    path.write_text(json.dumps(wf))
    p = subprocess.run([CLI, "--skip-prompt", "--no-json", "--workspace", COMFY, "run", "--workflow", str(path),
                        "--host", "127.0.0.1", "--port", str(server["port"]), "--wait"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert saved_video(server["out"], f"cli_{stem}") == size

    api = to_api(test_copy(server, name, f"api_{stem}"), server["info"])
    code, resp = http(server["port"], "/prompt", {"prompt": api})
    assert code == 200, resp
    status = wait_done(server["port"], resp["prompt_id"])["status"]
    assert status["status_str"] == "success", status
    assert saved_video(server["out"], f"api_{stem}") == size


def test_interrupt_stops_within_a_step(server):
    api = to_api(test_copy(server, "wan2.1_t2v_1.3B_fastvideo.json", "interrupted"), server["info"])
    sampler = next(v for v in api.values() if v["class_type"] == "FastVideoSampler")
    # Many steps of a larger video than SMALL's: the run must outlast the sleep below (400 tiny steps once did,
    # until the text padding was folded into one key and a tiny step got several times faster).
    sampler["inputs"].update(steps=1000, width=192, height=128, num_frames=17)
    sampler["inputs"]["seed"] = 12345  # not cached from another run
    code, resp = http(server["port"], "/prompt", {"prompt": api})
    assert code == 200, resp
    time.sleep(6)  # loading and a few steps
    start = time.time()
    assert http(server["port"], "/interrupt", {})[0] == 200
    hist = wait_done(server["port"], resp["prompt_id"], timeout=60)
    elapsed = time.time() - start
    messages = [m[0] for m in hist["status"].get("messages", [])]
    assert "execution_interrupted" in messages, hist["status"]
    assert elapsed < 5, elapsed  # one tiny step takes well under a second here
    assert http(server["port"], "/system_stats")[0] == 200


def test_bad_input_is_a_validation_error_and_server_lives(server):
    api = to_api(test_copy(server, "wan2.1_t2v_1.3B_fastvideo.json", "bad"), server["info"])
    next(v for v in api.values() if v["class_type"] == "FastVideoSampler")["inputs"]["num_frames"] = 80
    code, resp = http(server["port"], "/prompt", {"prompt": api})
    assert code == 400
    assert "num_frames must be 4n+1" in json.dumps(resp)
    assert http(server["port"], "/system_stats")[0] == 200
    assert http(server["port"], "/queue")[0] == 200


def test_native_wan_and_ours_in_one_graph(server):
    """ComfyUI's own Wan model (UNETLoader → KSampler → VAEDecode) and ours (same DiT file) in one
    prompt, one after the other, sharing our text encoding and ComfyUI's model management."""
    f = server["files"]
    small = dict(width=SMALL["width"], height=SMALL["height"])
    save = lambda images, prefix: [
        {"class_type": "CreateVideo", "inputs": {"images": images, "fps": 16.0}},
        {"class_type": "SaveVideo", "inputs": {"filename_prefix": prefix, "format": "auto", "codec": "auto"}}]
    nodes = {
        "load": {"class_type": "LoadFastVideoModel", "inputs": {
            "model": f["native_model"], "text_encoder": f["native_text_encoder"], "vae": f["vae"],
            "precision": "fp32", "weight_storage": "as_stored"}},
        "text": {"class_type": "FastVideoEncodePrompt", "inputs": {
            "model": ["load", 0], "prompt": "a fox in the snow", "negative_prompt": "blurry"}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f["native_model"], "weight_dtype": "default"}},
        "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
        "empty": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**small, "length": SMALL["num_frames"],
                                                                      "batch_size": 1}},
        "ksampler": {"class_type": "KSampler", "inputs": {
            "model": ["shift", 0], "seed": 0, "steps": SMALL["steps"], "cfg": 5.0, "sampler_name": "uni_pc",
            "scheduler": "simple", "positive": ["text", 0], "negative": ["text", 1], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f["vae"]}},
        "native_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["vae", 0]}},
        "ours": {"class_type": "FastVideoSampler", "inputs": {
            "model": ["load", 0], "positive": ["text", 0], "negative": ["text", 1], **small,
            "num_frames": SMALL["num_frames"], "steps": SMALL["steps"], "cfg": 5.0, "shift": 3.0,
            "scheduler": "unipc", "seed": 0, "cfg_gate": 1.0, "teacache_threshold": 0.0}},
        "our_decode": {"class_type": "FastVideoDecodeVAE", "inputs": {"model": ["load", 0], "samples": ["ours", 0]}},
        # our decoder on the native sampler's latent: the LATENT type is shared both ways
        "cross_decode": {"class_type": "FastVideoDecodeVAE", "inputs": {"model": ["load", 0], "samples": ["ksampler", 0]}},
    }
    for images, prefix in ((["native_decode", 0], "mixed_native"), (["our_decode", 0], "mixed_ours"),
                           (["cross_decode", 0], "mixed_cross")):
        create, out = save(images, prefix)
        nodes[f"{prefix}_video"] = create
        out["inputs"]["video"] = [f"{prefix}_video", 0]
        nodes[f"{prefix}_save"] = out
    code, resp = http(server["port"], "/prompt", {"prompt": nodes})
    assert code == 200, resp
    status = wait_done(server["port"], resp["prompt_id"])["status"]
    assert status["status_str"] == "success", status
    for prefix in ("mixed_native", "mixed_ours", "mixed_cross"):
        assert saved_video(server["out"], prefix) == (SMALL["num_frames"], SMALL["height"], SMALL["width"])
    assert http(server["port"], "/system_stats")[0] == 200
