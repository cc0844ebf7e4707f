"""The example workflows agree with the node definitions: inputs, links, widget values, model entries."""
import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nodes as fv  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# Native ComfyUI nodes used by the examples: widget count and input/output types.
NATIVE = {
    "CLIPLoader": (3, {}, ["CLIP"]),
    "CLIPTextEncode": (1, {"clip": "CLIP"}, ["CONDITIONING"]),
    "VAELoader": (1, {}, ["VAE"]),
    "VAEDecode": (0, {"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "CreateVideo": (1, {"images": "IMAGE", "audio": "AUDIO"}, ["VIDEO"]),
    "SaveVideo": (3, {"video": "VIDEO"}, []),
    "LoadImage": (2, {}, ["IMAGE", "MASK"]),
}


def spec_of(cls, groups=("required", "optional")):
    """(widgets [(name, type, options)], connections {name: type}) in ComfyUI's order."""
    widgets, conns = [], {}
    spec = cls.INPUT_TYPES()
    for group in groups:
        for name, entry in spec.get(group, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append((name, kind, opts))
                if opts.get("control_after_generate"):
                    widgets.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"], {}))
            else:
                conns[name] = kind
    return widgets, conns


def required_widget_count(cls) -> int:
    """Widgets that come from required inputs: a saved workflow holds at least these. Optional
    widgets added later (the sampler's spacing and sigmas) may be missing from workflows saved
    before them; ComfyUI fills in their defaults."""
    return len(spec_of(cls, groups=("required",))[0])


def test_there_are_nine_workflows():
    names = [os.path.basename(p) for p in WORKFLOWS]
    assert len(names) == 9 and any("fast" in n for n in names) and any("mixed_native" in n for n in names)
    assert {"wan2.1_t2v_14B_4step_lora.json", "fastwan2.1_t2v_1.3B_3step.json", "wan2.1_i2v_14B.json",
            "wan2.2_ti2v_5B.json", "wan2.2_t2v_A14B.json", "wan2.2_i2v_A14B.json"} <= set(names)


def test_fastwan_workflow_is_the_3step_recipe():
    """FastWan folder → VIDEO_SPARSE_ATTN at 0.8 → sampler dmd, cfg 1, no negative prompt wired."""
    wf = json.load(open(os.path.join(ROOT, "workflows", "fastwan2.1_t2v_1.3B_3step.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    loader, attn, sampler = (by_type[t] for t in ("LoadFastVideoModel", "FastVideoSetAttentionBackend",
                                                  "FastVideoSampler"))
    assert loader["widgets_values"][:3] == ["FastWan2.1-T2V-1.3B-Diffusers", "(from diffusers folder)",
                                            "(from diffusers folder)"]
    widgets, _ = spec_of(fv.SetAttentionBackend)
    a = dict(zip([w[0] for w in widgets], attn["widgets_values"]))
    assert a["backend"] == "VIDEO_SPARSE_ATTN" and a["sparsity"] == 0.8
    widgets, _ = spec_of(fv.FastVideoSampler)
    values = dict(zip([w[0] for w in widgets], sampler["widgets_values"]))
    assert values["scheduler"] == "dmd" and values["cfg"] == 1.0 and values["steps"] == 3
    settings = fv.sampling_nodes._settings(**{k: v for k, v in values.items() if k != "control_after_generate"})
    assert settings.num_steps == 3
    assert next(i for i in sampler["inputs"] if i["name"] == "negative")["link"] is None
    assert any(l[1] == loader["id"] and l[3] == attn["id"] for l in wf["links"])
    assert any(l[1] == attn["id"] and l[3] == sampler["id"] for l in wf["links"])


def test_i2v_workflow_is_wan_480p_image_to_video():
    """loader with the CLIP vision file, LoadImage → the sampler's image, Wan's 480p I2V settings, download links."""
    wf = json.load(open(os.path.join(ROOT, "workflows", "wan2.1_i2v_14B.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    loader, sampler = by_type["LoadFastVideoModel"], by_type["FastVideoSampler"]
    loader_values = dict(zip([w[0] for w in spec_of(fv.LoadFastVideoModel)[0]], loader["widgets_values"]))
    assert loader_values["model"].startswith("wan2.1_i2v_480p_14B") and loader_values["clip_vision"] == \
        "clip_vision_h.safetensors"
    values = dict(zip([w[0] for w in spec_of(fv.FastVideoSampler)[0]], sampler["widgets_values"]))
    assert (values["width"], values["height"], values["steps"], values["cfg"], values["shift"]) == (832, 480, 40, 5.0,
                                                                                                   3.0)
    image_input = next(i for i in sampler["inputs"] if i["name"] == "image")
    assert any(l[0] == image_input["link"] and l[1] == by_type["LoadImage"]["id"] for l in wf["links"])
    linked = {m["name"]: m["directory"] for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert linked == {loader_values["model"]: "diffusion_models", "umt5_xxl_fp8_e4m3fn_scaled.safetensors":
                      "text_encoders", "wan_2.1_vae.safetensors": "vae", "clip_vision_h.safetensors": "clip_vision"}


def test_wan22_ti2v_workflow_is_the_5b_recipe():
    """An image into the sampler, the 5B's own size and settings, the Wan 2.2 VAE, 24 fps."""
    wf = json.load(open(os.path.join(ROOT, "workflows", "wan2.2_ti2v_5B.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    widgets, _ = spec_of(fv.FastVideoSampler)
    values = dict(zip([w[0] for w in widgets], by_type["FastVideoSampler"]["widgets_values"]))
    assert (values["width"], values["height"], values["num_frames"]) == (1280, 704, 121)
    assert values["shift"] == 5.0 and values["cfg"] == 5.0
    image = by_type["LoadImage"]
    assert any(l[1] == image["id"] and l[3] == by_type["FastVideoSampler"]["id"] and l[5] == "IMAGE"
               for l in wf["links"])
    assert by_type["LoadFastVideoModel"]["widgets_values"][:3] == [
        "wan2.2_ti2v_5B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan2.2_vae.safetensors"]
    assert by_type["CreateVideo"]["widgets_values"] == [24.0]


def test_a14b_workflow_is_the_two_expert_recipe():
    """Both experts into the loader (with download links), Wan2.2 T2V-A14B's published settings: 40 steps,
    shift 12, boundary 0.875, cfg 4 for the high-noise expert and 3 for the low-noise one, 16 fps."""
    wf = json.load(open(os.path.join(ROOT, "workflows", "wan2.2_t2v_A14B.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    loader = by_type["LoadFastVideoModel"]
    widgets, _ = spec_of(fv.LoadFastVideoModel)
    lv = dict(zip([w[0] for w in widgets], loader["widgets_values"]))
    assert "high_noise_14B" in lv["model"] and "low_noise_14B" in lv["low_noise_model"]
    assert {lv["model"], lv["low_noise_model"]} <= {m["name"] for m in loader["properties"]["models"]}
    widgets, _ = spec_of(fv.FastVideoSampler)
    values = dict(zip([w[0] for w in widgets], by_type["FastVideoSampler"]["widgets_values"]))
    assert (values["steps"], values["shift"], values["boundary"], values["cfg"], values["cfg_low"]) == \
        (40, 12.0, 0.875, 4.0, 3.0)
    settings = fv.sampling_nodes._settings(**{k: v for k, v in values.items() if k != "control_after_generate"})
    assert (settings.boundary, settings.guidance_scale_low) == (0.875, 3.0)
    assert by_type["CreateVideo"]["widgets_values"] == [16.0]


def test_i2v_a14b_workflow_is_the_two_expert_image_recipe():
    """Both I2V experts into the loader (no CLIP vision: Wan2.2 I2V-A14B has none), LoadImage → the
    sampler's image, Wan2.2 I2V-A14B's published settings: 40 steps, shift 5, boundary 0.9, cfg 3.5
    for both experts, 480p at 16 fps."""
    from fastvideo_nodes.pipeline.experts import I2V_A14B
    wf = json.load(open(os.path.join(ROOT, "workflows", "wan2.2_i2v_A14B.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    loader, sampler = by_type["LoadFastVideoModel"], by_type["FastVideoSampler"]
    lv = dict(zip([w[0] for w in spec_of(fv.LoadFastVideoModel)[0]], loader["widgets_values"]))
    assert lv["model"] == "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    assert lv["low_noise_model"] == "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
    assert lv["clip_vision"] == "(none)"
    linked = {m["name"]: m["directory"] for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert linked == {lv["model"]: "diffusion_models", lv["low_noise_model"]: "diffusion_models",
                      "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "text_encoders", "wan_2.1_vae.safetensors": "vae"}
    values = dict(zip([w[0] for w in spec_of(fv.FastVideoSampler)[0]], sampler["widgets_values"]))
    assert (values["width"], values["height"], values["num_frames"]) == (832, 480, 81)
    assert (values["steps"], values["shift"], values["boundary"], values["cfg"], values["cfg_low"]) == (
        I2V_A14B.steps, I2V_A14B.shift, I2V_A14B.boundary, I2V_A14B.guidance_high, I2V_A14B.guidance_low)
    image_input = next(i for i in sampler["inputs"] if i["name"] == "image")
    assert any(l[0] == image_input["link"] and l[1] == by_type["LoadImage"]["id"] and l[5] == "IMAGE"
               for l in wf["links"])
    assert by_type["CreateVideo"]["widgets_values"] == [16.0]


def test_4step_lora_workflow_is_the_distilled_recipe():
    """loader → LoRA → sampler at 4 steps, CFG 1, simple spacing, shift 5; download links for every file."""
    wf = json.load(open(os.path.join(ROOT, "workflows", "wan2.1_t2v_14B_4step_lora.json")))
    by_type = {n["type"]: n for n in wf["nodes"]}
    lora = by_type["FastVideoLoRA"]
    widgets, _ = spec_of(fv.FastVideoSampler)
    values = dict(zip([w[0] for w in widgets], by_type["FastVideoSampler"]["widgets_values"]))
    assert values["steps"] == 4 and values["cfg"] == 1.0 and values["shift"] == 5.0
    assert values["spacing"] == "simple" and values["scheduler"] in ("euler", "lcm") and values["sigmas"] == ""
    assert lora["widgets_values"][0] == "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
    loader_id = by_type["LoadFastVideoModel"]["id"]
    assert any(l[1] == loader_id and l[3] == lora["id"] for l in wf["links"])
    assert any(l[1] == lora["id"] and l[3] == by_type["FastVideoSampler"]["id"] for l in wf["links"])
    linked = {m["name"] for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert {"umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors",
            lora["widgets_values"][0], by_type["LoadFastVideoModel"]["widgets_values"][0]} <= linked


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_matches_definitions(path):
    wf = json.load(open(path))
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"] in fv.NODE_CLASS_MAPPINGS:
            widgets, conns = spec_of(fv.NODE_CLASS_MAPPINGS[n["type"]])
            outs = list(fv.NODE_CLASS_MAPPINGS[n["type"]].RETURN_TYPES)
            cls = fv.NODE_CLASS_MAPPINGS[n["type"]]
            assert required_widget_count(cls) <= len(n["widgets_values"]) <= len(widgets), \
                (n["type"], n["widgets_values"], widgets)
            for value, (name, kind, opts) in zip(n["widgets_values"], widgets):
                if isinstance(kind, list) and name not in ("model", "text_encoder", "vae", "lora_name",
                                                           "clip_vision", "low_noise_model"):  # files vary
                    assert value in kind, (n["type"], name, value)
                if kind in ("INT", "FLOAT"):
                    assert opts.get("min", value) <= value <= opts.get("max", value), (n["type"], name, value)
                if kind == "BOOLEAN":
                    assert isinstance(value, bool)
            for i in n["inputs"]:
                assert conns.get(i["name"]) == i["type"], (n["type"], i)
            assert [o["type"] for o in n["outputs"]] == outs
            values = dict(zip([w[0] for w in widgets], n["widgets_values"]))
            if n["type"] == "FastVideoSampler":
                assert fv.FastVideoSampler.VALIDATE_INPUTS(**values) is True
            if n["type"] == "FastVideoLoRA":
                assert fv.FastVideoLoRA.VALIDATE_INPUTS(**values) is True
            if n["type"] == "LoadFastVideoModel":
                assert fv.LoadFastVideoModel.VALIDATE_INPUTS(weight_storage=values["weight_storage"]) is True
            assert n.get("properties", {}).get("Node name for S&R", n["type"]) == n["type"]
        else:
            count, conns, outs = NATIVE[n["type"]]
            assert len(n["widgets_values"]) == count
            assert {i["name"]: i["type"] for i in n["inputs"]} == conns
            assert [o["type"] for o in n["outputs"]] == outs
        for m in n.get("properties", {}).get("models", []):
            assert m["url"].startswith("https://") and m["url"].endswith(m["name"])
            assert m["directory"] in ("diffusion_models", "text_encoders", "vae", "loras", "clip_vision")
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == kind and link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] == kind and by_id[dst]["inputs"][dst_slot]["link"] == link_id
    # Every required connection is wired.
    for n in wf["nodes"]:
        if n["type"] in fv.NODE_CLASS_MAPPINGS:
            required = fv.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()["required"]
            for i in n["inputs"]:
                if i["name"] in required:
                    assert i["link"] is not None, (n["type"], i["name"])
