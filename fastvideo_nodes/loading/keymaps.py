"""diffusers → original Wan tensor names, for the DiT and the VAE.

The models use the original Wan names (as ComfyUI files do), so a diffusers file is renamed
tensor by tensor while it streams in; the test helpers use the same maps to write files.
"""
from __future__ import annotations

import re

# DiT: (regex, replacement), applied in order.
DIT_DIFFUSERS_TO_WAN = [
    # image-to-video: the CLIP-token MLP and cross-attention's image keys/values
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"\.attn2\.add_k_proj\.", ".cross_attn.k_img."), (r"\.attn2\.add_v_proj\.", ".cross_attn.v_img."),
    (r"\.attn2\.norm_added_k\.", ".cross_attn.norm_k_img."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    # FastWan's extra projection: under attn1 in its diffusers files, beside it in FastVideo's own layout.
    (r"^(blocks\.\d+)\.(?:self_attn\.)?to_gate_compress\.", r"\1.self_attn.gate_compress."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is the affine cross-attn norm
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]

# VAE (AutoencoderKLWan). Residual-block parts first: in diffusers names conv1/conv2 only occur
# inside blocks (the top-level convs are conv_in, quant_conv, …).
VAE_DIFFUSERS_TO_WAN = [
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


def _apply(rules, name: str) -> str:
    for pat, rep in rules:
        name = re.sub(pat, rep, name)
    return name


def dit_name(name: str) -> str:
    """A diffusers WanTransformer3DModel tensor name in original Wan naming."""
    return _apply(DIT_DIFFUSERS_TO_WAN, name)


def vae_name(name: str, num_res_blocks: int = 2, residual: bool = False) -> str:
    """A diffusers AutoencoderKLWan tensor name in original Wan naming (residual: the Wan 2.2 VAE,
    whose stages are nested: `down_blocks.i.resnets.j` ↔ `downsamples.i.downsamples.j`)."""
    if residual:
        for pat, rep in ((r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
                         (r"^encoder\.down_blocks\.(\d+)\.downsampler\.",
                          rf"encoder.downsamples.\1.downsamples.{num_res_blocks}."),
                         (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
                         (r"^decoder\.up_blocks\.(\d+)\.upsampler\.",
                          rf"decoder.upsamples.\1.upsamples.{num_res_blocks + 1}.")):
            name = re.sub(pat, rep, name)
        return _apply(VAE_DIFFUSERS_TO_WAN, name)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:  # each up block is (num_res_blocks + 1) resnets then one upsampler, flattened
        j = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
        name = f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + j}.{m.group(4)}"
    return _apply(VAE_DIFFUSERS_TO_WAN, name)


def is_diffusers_vae(names) -> bool:
    return any(n.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for n in names)


def is_residual_vae(names) -> bool:
    """The Wan 2.2 VAE (nested residual stages), in either naming."""
    return any(n.startswith(("encoder.down_blocks.0.resnets.", "encoder.downsamples.0.downsamples.",
                             "decoder.upsamples.0.upsamples.")) for n in names)
