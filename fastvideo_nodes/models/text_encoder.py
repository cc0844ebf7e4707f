"""UMT5 text encoder: prompt encoding as Wan does it.

The network is transformers' `UMT5EncoderModel` (`loading/text_encoder.py` builds it from the
files users have); what we own is encoding a prompt exactly as diffusers' WanPipeline does:
clean → tokenize to 512 → last hidden state → zeros past the prompt's real length.
"""
from __future__ import annotations

import html
import re

import torch

TEXT_LEN = 512

# Wan 2.1's default negative prompt, translated from the official Chinese one.
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, "
    "still picture, messy background, three legs, many people in the background, walking backwards")


def clean_prompt(text: str) -> str:
    """The cleaning diffusers' WanPipeline applies: ftfy (when installed), HTML unescape, whitespace."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompt → [B, 512, dim] embeddings. Holds the tokenizer and the UMT5 encoder."""
    text_len = TEXT_LEN

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.dim = model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def to(self, device) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, 512, dim] float32; rows past each prompt's token count are zero."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=TEXT_LEN,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        keep = mask.gt(0).unsqueeze(-1)
        return torch.where(keep, hidden, torch.zeros((), device=hidden.device))


class SentencePieceTokenizer:
    """T5-style tokenization straight from sentencepiece bytes (the `spiece_model` tensor):
    pieces + </s>, truncated to max_length keeping </s>, padded with id 0. Called like a
    transformers tokenizer for the arguments we use; needs no protobuf or conversion."""

    def __init__(self, data: bytes):
        """Raises ValueError when `data` is not a sentencepiece model (ImportError without the package)."""
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:  # sentencepiece's parse failure; its own text is an internal source location
            raise ValueError(f"{len(data)} bytes that sentencepiece cannot parse as a model") from None
        self.eos, self.pad = self.sp.eos_id(), max(self.sp.pad_id(), 0)

    def __call__(self, prompts, *, max_length: int, **_):
        from types import SimpleNamespace
        ids = torch.full((len(prompts), max_length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        for row, text in enumerate(prompts):
            toks = self.sp.encode(text)[: max_length - 1] + [self.eos]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)
