"""TeaCache for Wan2.1: skip all transformer blocks when the timestep signal barely moved.

Per forward: acc += poly(rel_l1(signal, previous signal)); if acc < threshold the blocks are
skipped and the residual of the last full pass (tokens_out - tokens_in) is added instead; else
the blocks run, the residual is cached and acc resets. The signal is the timestep embedding e
("default" mode) or its 6·dim projection e0 ("ret" mode). Because the signal depends only on the
timestep, every sequence-parallel rank takes the same decision without talking to the others.

Forced full steps (as published): default mode the first and the last step; ret mode the first 5.
The conditional and unconditional passes each own one TeaCache.
"""
from __future__ import annotations

import torch

from ..errors import FastVideoError

# Rescaling polynomials, highest power first (TeaCache4Wan2.1).
COEFFICIENTS = {
    ("1.3B", "default"): [2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1],
    ("14B", "default"): [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],
    ("1.3B", "ret"): [-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2],
    ("14B", "ret"): [-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1],
    # Wan2.1 I2V-14B, fitted per checkpoint resolution (the forced steps are the same as for T2V).
    ("I2V-480P", "default"): [-3.02331670e2, 2.23948934e2, -5.25463970e1, 5.87348440, -2.01973289e-1],
    ("I2V-720P", "default"): [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
    ("I2V-480P", "ret"): [2.57151496e5, -3.54229917e4, 1.40286849e3, -1.35890334e1, 1.32517977e-1],
    ("I2V-720P", "ret"): [8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2],
}
MODES = ("default", "ret")


def coefficients_for(size_name: str, mode: str, *, image_to_video: bool = False,
                     pixels: int = 480 * 832) -> list[float]:
    """Published coefficients for a DiT size; models of other sizes (tiny tests) use the 1.3B ones.
    Image-to-video models take the table of the I2V checkpoint for the video's size (720P above 480×832
    pixels). Others (Wan2.2 TI2V-5B) have none published and use the 1.3B table."""
    if image_to_video:
        return COEFFICIENTS[("I2V-720P" if pixels > 480 * 832 else "I2V-480P", mode)]
    return COEFFICIENTS[("14B" if size_name == "14B" else "1.3B", mode)]


def polyval(coeffs: list[float], x: float) -> float:
    y = 0.0
    for c in coeffs:
        y = y * x + c
    return y


class TeaCache:
    """State of one guidance branch across the steps of one generation."""

    def __init__(self, threshold: float, num_steps: int, coefficients: list[float], mode: str = "default"):
        if mode not in MODES:
            raise FastVideoError(f"teacache_mode {mode!r} is unknown; use one of {MODES}.")
        self.threshold, self.num_steps, self.coefficients, self.mode = threshold, num_steps, coefficients, mode
        self.step = 0
        self.acc = 0.0
        self.previous: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.computed = 0
        self.skipped = 0

    def forced(self, step: int) -> bool:
        if self.mode == "ret":
            return step < 5
        return step == 0 or step >= self.num_steps - 1

    def decide(self, signal: torch.Tensor) -> bool:
        """True when this step must run the blocks. Updates the accumulator and the previous signal."""
        if self.forced(self.step) or self.previous is None or self.residual is None:
            compute = True
        else:
            rel = ((signal - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.acc += polyval(self.coefficients, rel)
            compute = self.acc >= self.threshold
        if compute:
            self.acc = 0.0
        self.previous = signal.detach().clone()
        return compute

    def __call__(self, tokens: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, run) -> torch.Tensor:
        """The DiT's `cache` hook: run(tokens) through the blocks, or reuse the cached residual."""
        if self.decide(e0 if self.mode == "ret" else e):
            out = run(tokens)
            self.residual = out - tokens
            self.computed += 1
            return out
        self.skipped += 1
        assert self.residual is not None  # decide() computes when there is none
        return tokens + self.residual
