"""Every node called the way ComfyUI calls it (INPUT_TYPES → FUNCTION with keyword inputs), on tiny files."""
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nodes as fv  # noqa: E402  (the pack's node package; ComfyUI itself is not installed in CI)
from fastvideo_nodes.attention.sliding_tile import SlidingTileOptions  # noqa: E402
from fastvideo_nodes.errors import FastVideoError  # noqa: E402
from fastvideo_nodes.pipeline.options import LoadOptions  # noqa: E402
from fastvideo_nodes.pipeline.sampler import SamplingSettings  # noqa: E402

SIZE = dict(width=48, height=32, num_frames=5)


def call(cls, **inputs):
    obj = cls()
    return getattr(obj, cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("nodes")), seed=5)


@pytest.fixture(scope="module")
def model(files):
    c = files["comfy"]
    (m,) = call(fv.LoadFastVideoModel, model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                precision="fp32", weight_storage="as_stored")
    return m


def sampler_inputs(model, pos, neg, **kw):
    base = dict(model=model, positive=pos, negative=neg, steps=2, cfg=5.0, shift=3.0, scheduler="unipc", seed=3,
                cfg_gate=1.0, teacache_threshold=0.0, **SIZE)
    return {**base, **kw}


def test_mappings_and_input_types():
    # Registry keys are global across installed packs: every one carries the pack's name.
    assert set(fv.NODE_CLASS_MAPPINGS) == {"LoadFastVideoModel", "FastVideoSetAttentionBackend",
                                          "FastVideoEncodePrompt", "FastVideoSampler", "FastVideoDecodeVAE",
                                          "FastVideoParallelWorkers", "FastVideoLoRA"}
    for name, cls in fv.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert "required" in spec and cls.CATEGORY == "FastVideo" and hasattr(cls, cls.FUNCTION)
        assert name in fv.NODE_DISPLAY_NAME_MAPPINGS


def test_load_shares_parts_and_replacing_frees_the_previous(files, model):
    import gc
    import weakref
    c = files["comfy"]
    (again,) = call(fv.LoadFastVideoModel, model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                    precision="fp32", weight_storage="as_stored")
    assert again._parts is model._parts and again.dit is model.dit  # loaded once, shared
    node = fv.LoadFastVideoModel()  # ComfyUI keeps one instance per node of the graph
    kw = dict(text_encoder="(from diffusers folder)", vae="(from diffusers folder)", precision="fp16",
              weight_storage="as_stored")
    (first,) = node.load(model=files["folder"], **kw)
    assert first._parts.dit is not None and first._parts.vae is not None  # loaded by the node, not later
    dit = weakref.ref(first._parts.dit)
    (other,) = node.load(model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"], precision="fp16",
                         weight_storage="as_stored")
    assert other._parts is not first._parts
    gc.collect()
    assert dit() is None  # the node's previous model was closed before the new one loaded
    import nodes.model_nodes as mn
    assert not hasattr(mn, "_loaded")  # no module-level cache of weights


def test_encode_sample_decode_chain(model):
    before = dict(vars(model))
    pos, neg = call(fv.EncodePrompt, model=model, prompt="a boat on a lake", negative_prompt="blurry",
                    offload_text_encoder=True)  # the former input, from a saved workflow: accepted, ignored
    assert vars(model) == before  # no node mutates its input
    assert pos[0][0].shape == (1, 512, 32) and pos[0][1] == {}
    (latent,) = call(fv.FastVideoSampler, **sampler_inputs(model, pos, neg))
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 16, 2, 4, 6)
    # Same as the engine API with the same settings: the node adds nothing to the math.
    want = model.sample(pos[0][0], neg[0][0], SamplingSettings(steps=2, seed=3, height=32, width=48, num_frames=5))
    assert torch.equal(latent["samples"], want)
    (image,) = call(fv.DecodeVAE, model=model, samples=latent)
    assert image.shape == (5, 32, 48, 3) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    (tiled,) = call(fv.DecodeVAE, model=model, samples=latent, tile_size=4)
    assert tiled.shape == image.shape


def test_native_conditioning_interop(model):
    """CLIPTextEncode(type wan) gives [[tensor [1, L, dim], {...}]]; our sampler takes it as is."""
    native = [[torch.randn(1, 77, 32), {"pooled_output": None}]]
    (latent,) = call(fv.FastVideoSampler, **sampler_inputs(model, native, None))
    assert latent["samples"].shape == (1, 16, 2, 4, 6)


def test_decode_native_ksampler_latent(model):
    """A native KSampler's Wan latent is raw VAE space [B,16,T,H,W]: DecodeVAE decodes its first item."""
    z = torch.randn(2, 16, 2, 4, 6)
    (image,) = call(fv.DecodeVAE, model=model, samples={"samples": z})
    assert image.shape == (5, 32, 48, 3)
    with pytest.raises(FastVideoError, match="expected a Wan video latent"):
        call(fv.DecodeVAE, model=model, samples={"samples": torch.randn(1, 4, 8, 8)})


def test_validate_inputs_rejects_bad_sizes():
    v = fv.FastVideoSampler.VALIDATE_INPUTS
    assert v(width=832, height=480, num_frames=81) is True
    assert "num_frames must be 4n+1" in v(width=832, height=480, num_frames=80)
    assert "width must be a positive multiple of 16" in v(width=830, height=480, num_frames=81)
    assert "cfg_gate" in v(cfg_gate=1.5)


def test_load_node_builds_load_options_and_takes_old_words(files, model):
    """The node's widgets become the same LoadOptions as the API's; workflows saved with the older
    weight_storage words still validate and load the same options."""
    assert model.options == LoadOptions(precision="fp32", weight_storage="as_stored")
    v = fv.LoadFastVideoModel.VALIDATE_INPUTS
    for old, new in (("as stored", "as_stored"), ("fp8_e4m3fn", "fp8"), ("fp8_e4m3fn_fast", "fp8_fast")):
        assert v(weight_storage=old) is True and v(weight_storage=new) is True
        assert fv.LoadFastVideoModel.options("bf16", old) == fv.LoadFastVideoModel.options("bf16", new)
    msg = v(weight_storage="int4")
    assert "weight_storage 'int4' is unknown" in msg and "as_stored, fp8, fp8_fast" in msg
    opts = fv.LoadFastVideoModel.options("fp16", "fp8_fast", compile=True, gpu_memory_gb=0.0, text_encoder_device="cpu")
    assert (opts.precision, opts.weight_storage, opts.compile, opts.gpu_memory_gb, opts.text_encoder_device) == (
        "fp16", "fp8_fast", True, None, "cpu")
    c = files["comfy"]
    load = lambda word: call(fv.LoadFastVideoModel, model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                             precision="fp32", weight_storage=word)[0]
    assert load("as stored")._parts is load("as_stored")._parts  # the same options: the same loaded parts


def test_set_attention_backend_shares_weights(model):
    sta = call(fv.SetAttentionBackend, model=model, backend="SLIDING_TILE_ATTN", sta_window="3,3,3")["result"][0]
    assert sta is not model and sta._parts is model._parts
    assert sta.attention_backend == "SLIDING_TILE_ATTN"
    assert sta.attention_options == SlidingTileOptions(window=(3, 3, 3))
    dense = call(fv.SetAttentionBackend, model=model, backend="TORCH_SDPA", sta_window="3,3,3")["result"][0]
    assert dense.attention_options is None
    assert fv.SetAttentionBackend.VALIDATE_INPUTS(backend="auto") is True
    assert "sta_window must be three positive integers" in fv.SetAttentionBackend.VALIDATE_INPUTS(
        backend="SLIDING_TILE_ATTN", sta_window="3,3")
    if not torch.cuda.is_available():
        assert "cannot run here" in fv.SetAttentionBackend.VALIDATE_INPUTS(backend="SAGE_ATTN")


def test_progress_previews_and_cancel(model, monkeypatch):
    """With ComfyUI's modules present: one progress update (with a JPEG preview) per step, and an
    interrupt raised by ComfyUI stops sampling before the next step."""
    updates = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total, preview[0] if preview else None, preview[1].size if preview else None))

    class Interrupted(Exception):
        pass

    state = {"interrupt": False}

    def throw():
        if state["interrupt"]:
            raise Interrupted()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    pos = [[torch.randn(1, 10, 32), {}]]
    call(fv.FastVideoSampler, **sampler_inputs(model, pos, None, steps=3))
    assert updates == [(1, 3, "JPEG", (6, 4)), (2, 3, "JPEG", (6, 4)), (3, 3, "JPEG", (6, 4))]

    updates.clear()
    real = ProgressBar.update_absolute

    def interrupt_after_first(self, value, total=None, preview=None):
        real(self, value, total, preview)
        state["interrupt"] = True  # the user presses cancel during step 1

    monkeypatch.setattr(ProgressBar, "update_absolute", interrupt_after_first)
    with pytest.raises(Interrupted):
        call(fv.FastVideoSampler, **sampler_inputs(model, pos, None, steps=4))
    assert [u[0] for u in updates] == [1]


def test_parallel_node_validates_degree(model):
    with pytest.raises(FastVideoError, match="does not divide the model's 2 attention heads; use one of \\[1, 2\\]"):
        call(fv.FastVideoParallelWorkers, model=model, num_gpus=3)
    (par,) = call(fv.FastVideoParallelWorkers, model=model, num_gpus=2)
    assert par.num_gpus == 2 and model.num_gpus == 1


def test_pack_entry_point_imports():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastvideo_nodes_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fastvideo_nodes_pack"] = pack
    spec.loader.exec_module(pack)
    assert "FastVideoSampler" in pack.NODE_CLASS_MAPPINGS
