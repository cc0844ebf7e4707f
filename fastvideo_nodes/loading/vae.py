"""Load the Wan 2.1 VAE from `wan_2.1_vae.safetensors` (original names) or a diffusers `vae/` folder."""
from __future__ import annotations

import os
import re

import torch

from ..errors import ModelFileError
from ..models.wan_vae import WanVAE, WanVAEConfig
from . import detect
from .files import all_keys, iter_tensors, locate
from .materialize import materialize

ROLE = "VAE"

# diffusers AutoencoderKLWan name → original Wan name. Residual-block parts first: in diffusers
# names conv1/conv2 only occur inside blocks (the top-level convs are conv_in, quant_conv, …).
_DIFFUSERS_TO_WAN = [
    (r"\.norm1\.", ".residual.0."), (r"\.conv1\.", ".residual.2."),
    (r"\.norm2\.", ".residual.3."), (r"\.conv2\.", ".residual.6."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
]


def diffusers_to_wan_name(name: str, num_res_blocks: int = 2) -> str:
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:  # each up block is (num_res_blocks + 1) resnets then one upsampler, flattened
        j = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
        name = f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + j}.{m.group(4)}"
    for pat, rep in _DIFFUSERS_TO_WAN:
        name = re.sub(pat, rep, name)
    return name


def _locate(path: str):
    return locate(path, ROLE, "vae", "diffusion_pytorch_model", "wan_2.1_vae.safetensors")


def load_vae(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    files, config = _locate(os.fspath(path))
    header = all_keys(files, ROLE)
    detect.expect_kind(header, ("wan_vae",), ROLE, path)
    prefix, names = detect.strip_prefix(header)
    diffusers_names = any(n.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for n in names)
    if config is not None:
        if config.get("is_residual") or config.get("z_dim", 16) != 16 or config.get("patch_size"):
            raise ModelFileError(f"{ROLE}: {path!r} is a Wan2.2 VAE, which is not supported yet; "
                                 "use the Wan 2.1 VAE (wan_2.1_vae.safetensors).")
    rename = diffusers_to_wan_name if diffusers_names else (lambda n: n)
    shapes = {rename(n): tuple(header[prefix + n]["shape"]) for n in names}
    cfg = WanVAEConfig(base_dim=shapes["encoder.conv1.weight"][0], z_dim=shapes["conv2.weight"][0])

    with torch.device("meta"):
        vae = WanVAE(cfg)

    def tensors():
        for k, t in iter_tensors(files, ROLE):
            yield rename(k[len(prefix):] if prefix and k.startswith(prefix) else k), t

    materialize(vae, tensors(), role=f"{ROLE} {os.path.basename(path)!r}", dtype=dtype, device=device)
    return vae
