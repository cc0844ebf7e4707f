"""Flow-matching schedulers: UniPC multistep (order 2, bh2, x0-predicting), Euler, LCM and DMD.

UniPC and Euler follow the schedules diffusers uses for Wan, step for step, so seeds reproduce:
- "unipc" = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=shift, solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero").
  The DiT gets *integer* timesteps int(σ·1000) while the update uses the continuous σ.
- "euler" = FlowMatchEulerDiscreteScheduler(shift=shift): float timesteps σ·1000, x ← x + (σ' − σ)·v.
- "lcm" (ComfyUI's LCM sampler, for step-distilled LoRAs): x0 = x − σ·v, then re-noise to the next
  sigma with fresh noise, x' = (1 − σ')·x0 + σ'·ε; the last step returns x0.
- "dmd" (FastVideo's DMD-distilled models, FastWan): the same predict-x0-and-re-noise step over a
  fixed list of integer DiT timesteps (FastWan: 1000, 757, 522). As FastVideo's DMD stage does, each
  timestep's σ is looked up in the 1000-step training table shifted by 8 (the entry whose timestep
  is nearest), so σ is t/1000 to within 4e-4 (757 → 0.75676); the run's own shift plays no part.

Few-step runs choose their sigmas: spacing "simple" (ComfyUI's: every N-th entry of the shifted
1000-step table, 4 steps at shift 5 → timesteps 1000, 937.5, 833.3, 625) or an explicit list used
as given (no shift). Both are for euler and lcm, whose DiT timesteps are float σ·1000; UniPC keeps
diffusers' integer-timestep schedule, so it refuses them rather than silently differ from diffusers.

The model predicts the flow velocity v; with x_σ = (1 − σ)·x0 + σ·noise, x0 = x − σ·v.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import FastVideoError

SCHEDULERS = ("unipc", "euler", "lcm", "dmd")
SPACINGS = ("default", "simple")
TRAIN_STEPS = 1000
DMD_TIMESTEPS = (1000, 757, 522)  # FastWan2.1's three steps
DMD_TABLE_SHIFT = 8.0  # FastVideo's DMD stage reads σ from the shift-8 table, whatever the model's shift


def shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow shift: σ → s·σ / (1 + (s − 1)·σ); s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class Scheduler:
    timesteps: torch.Tensor  # [N] float32, what the DiT is given (0..1000)
    sigmas: torch.Tensor     # [N + 1] float32, decreasing to 0

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.index = 0

    def reset(self) -> None:
        self.index = 0

    def denoised(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 estimate at the current step (previews)."""
        return sample - float(self.sigmas[self.index]) * velocity.float()

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def default_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """diffusers' FlowMatchEulerDiscreteScheduler spacing (without the final 0)."""
    # diffusers bounds the schedule by its training sigmas, which are already shifted once.
    train = shifted(np.linspace(1, TRAIN_STEPS, TRAIN_STEPS, dtype=np.float32)[::-1] / TRAIN_STEPS, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    return shifted(np.linspace(sigma_max * TRAIN_STEPS, sigma_min * TRAIN_STEPS, num_steps) / TRAIN_STEPS, shift)


def simple_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """ComfyUI's "simple" spacing: σ_i = shift(t_i / 1000) with t_i = 1000 − ⌊1000·i/N⌋, i = 0..N−1
    (= shift(1 − i/N) whenever N divides 1000)."""
    t = TRAIN_STEPS - np.floor(np.arange(num_steps) * (TRAIN_STEPS / num_steps))
    return shifted(t / TRAIN_STEPS, shift).astype(np.float32)


class FlowEuler(Scheduler):
    def __init__(self, num_steps: int, shift: float, sigmas: np.ndarray | None = None):
        super().__init__(num_steps)
        table = default_sigmas(num_steps, shift) if sigmas is None else sigmas
        sig = torch.as_tensor(np.asarray(table, dtype=np.float32))
        self.timesteps = sig * TRAIN_STEPS
        self.sigmas = torch.cat([sig, torch.zeros(1)])

    def step(self, velocity, sample):
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]
        self.index += 1
        return sample.float() + dt * velocity.float()


class FlowLCM(FlowEuler):
    """Predict x0, then re-noise it to the next sigma with fresh noise from `generator` (CPU)."""

    def __init__(self, num_steps: int, shift: float, sigmas: np.ndarray | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(num_steps, shift, sigmas)
        self.generator = generator if generator is not None else torch.Generator("cpu").manual_seed(0)

    def step(self, velocity, sample):
        x0 = sample.float() - float(self.sigmas[self.index]) * velocity.float()
        self.index += 1
        s_next = float(self.sigmas[self.index])
        if s_next == 0:
            return x0
        # Drawn on the CPU so that a seed gives the same noise on every device and worker.
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
        return (1 - s_next) * x0 + s_next * eps


def dmd_sigmas(timesteps: Sequence[int], table_shift: float = DMD_TABLE_SHIFT) -> np.ndarray:
    """σ of each timestep: the shifted training table's entry whose timestep (σ·1000) is nearest."""
    table = shifted(np.linspace(1, TRAIN_STEPS, TRAIN_STEPS, dtype=np.float32)[::-1] / TRAIN_STEPS,
                    table_shift).astype(np.float32)
    nearest = [int(np.argmin(np.abs(table * TRAIN_STEPS - t))) for t in timesteps]
    return table[nearest]


class FlowDMD(FlowLCM):
    """DMD sampling: the DiT sees the integer timesteps of the list; each step predicts x0 and
    re-noises it to the next timestep's σ with noise from `generator`; the last returns x0."""

    def __init__(self, timesteps: Sequence[int] = DMD_TIMESTEPS, generator: torch.Generator | None = None):
        super().__init__(len(timesteps), 1.0, dmd_sigmas(timesteps), generator)
        self.timesteps = torch.tensor([float(t) for t in timesteps], dtype=torch.float32)


class FlowUniPC(Scheduler):
    """UniPC with the B(h) = e^h − 1 ("bh2") variant, predicting x0, order ≤ 2.

    Each step: correct the current sample with the new x0 (UniC), then predict the next sample
    (UniP) from the last one or two x0 estimates, in λ = log((1 − σ)/σ) time.
    """

    def __init__(self, num_steps: int, shift: float):
        super().__init__(num_steps)
        sig = shifted(np.linspace(1, 1 / TRAIN_STEPS, num_steps + 1)[:-1], shift)
        if abs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6  # keeps log(σ/(1−σ)) finite at the first step, as diffusers does
        self.timesteps = torch.from_numpy(sig * TRAIN_STEPS).to(torch.int64).float()
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.x0s: list[torch.Tensor] = []   # last two x0 estimates, newest last
        self.last_sample = None             # the sample before the last prediction
        self.last_order = 1

    def _lambda(self, i: int) -> float:
        s = float(self.sigmas[i])
        return math.log(1 - s) - math.log(s) if s > 0 else math.inf

    def _h(self, i_to: int, i_from: int) -> tuple[float, float]:
        """h = λ_to − λ_from and B(h) = e^{−h} − 1 (= hφ₁ for x0 prediction)."""
        h = self._lambda(i_to) - self._lambda(i_from)
        return h, math.expm1(-h)

    def _base(self, x, x0, i_to, i_from, b_h) -> torch.Tensor:
        """First-order (DPM-Solver-1) move of x from σ_from to σ_to given x0."""
        s_to, s_from = float(self.sigmas[i_to]), float(self.sigmas[i_from])
        return (s_to / s_from) * x - (1 - s_to) * b_h * x0

    def _corrector(self, x0_new: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last step (σ_{i−1} → σ_i) using the x0 just computed at σ_i."""
        i, order = self.index, self.last_order
        h, b_h = self._h(i, i - 1)
        m0 = self.x0s[-1]
        out = self._base(self.last_sample, m0, i, i - 1, b_h)
        a = 1 - float(self.sigmas[i])
        if order == 1:
            return out - a * b_h * 0.5 * (x0_new - m0)
        rk = (self._lambda(i - 2) - self._lambda(i - 1)) / h
        d1 = (self.x0s[-2] - m0) / rk
        # Solve [[1, 1], [rk, 1]]·ρ = b with b_k from the φ-functions of −h.
        hh = -h
        phi = b_h / hh - 1
        b1 = phi / b_h
        b2 = (phi / hh - 0.5) * 2 / b_h
        rho0 = (b1 - b2) / (1 - rk)
        rho1 = b1 - rho0
        return out - a * b_h * (rho0 * d1 + rho1 * (x0_new - m0))

    def _predictor(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: σ_i → σ_{i+1} from the newest x0 (and the previous one for order 2)."""
        i = self.index
        h, b_h = self._h(i + 1, i)
        m0 = self.x0s[-1]
        out = self._base(sample, m0, i + 1, i, b_h)
        if order == 2:
            rk = (self._lambda(i - 1) - self._lambda(i)) / h
            d1 = (self.x0s[-2] - m0) / rk
            out = out - (1 - float(self.sigmas[i + 1])) * b_h * 0.5 * d1
        return out

    def step(self, velocity, sample):
        sample = sample.float()
        x0 = sample - float(self.sigmas[self.index]) * velocity.float()
        if self.index > 0:
            sample = self._corrector(x0, sample)
        self.x0s = (self.x0s + [x0])[-2:]
        # Order 2 once two x0 are known; the final step drops to order 1 (lower_order_final).
        order = min(2, self.num_steps - self.index, len(self.x0s))
        self.last_sample = sample
        out = self._predictor(sample, order)  # at σ = 0 this returns x0 exactly
        self.last_order = order
        self.index += 1
        return out


def check_sigmas(sigmas: Sequence[float]) -> None:
    """An explicit sigma list: non-empty, finite, strictly descending, in (0, 1]."""
    vals = [float(s) for s in sigmas]
    if not vals:
        raise FastVideoError("sigmas must hold at least one value (e.g. 1.0, 0.75, 0.5, 0.25); got an empty list.")
    for i, s in enumerate(vals):
        if not (0 < s <= 1):  # also refuses NaN
            raise FastVideoError(f"sigmas must lie in (0, 1], got {s} at position {i + 1}; the final 0 is added "
                                 "automatically.")
        if i and s >= vals[i - 1]:
            raise FastVideoError(f"sigmas must be strictly descending, got {vals[i - 1]} then {s} at position {i + 1}.")


def check_timesteps(timesteps: Sequence[int]) -> None:
    """A DMD timestep list: non-empty whole numbers, strictly descending, in 1..1000."""
    vals = list(timesteps)
    if not vals:
        raise FastVideoError(f"timesteps must hold at least one value (FastWan uses "
                             f"{', '.join(map(str, DMD_TIMESTEPS))}); got an empty list.")
    for i, t in enumerate(vals):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 1 <= t <= TRAIN_STEPS:
            raise FastVideoError(f"timesteps must be whole numbers from 1 to {TRAIN_STEPS}, got {t!r} at position "
                                 f"{i + 1}.")
        if i and t >= vals[i - 1]:
            raise FastVideoError(f"timesteps must be strictly descending, got {vals[i - 1]} then {t} at position "
                                 f"{i + 1}.")


def make_scheduler(name: str, num_steps: int, shift: float, *, spacing: str = "default",
                   sigmas: Sequence[float] | None = None, generator: torch.Generator | None = None,
                   timesteps: Sequence[int] | None = None) -> Scheduler:
    """A scheduler for one run. sigmas (descending, in (0, 1]) override num_steps, shift and spacing;
    generator feeds the LCM and DMD re-noising (ignored by the others); timesteps is DMD's list
    (None = FastWan's), which alone decides a DMD run's steps."""
    if name not in SCHEDULERS:
        raise FastVideoError(f"scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}.")
    if spacing not in SPACINGS:
        raise FastVideoError(f"spacing {spacing!r} is unknown; use one of {', '.join(SPACINGS)}.")
    if sigmas is not None:
        check_sigmas(sigmas)
        num_steps = len(sigmas)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise FastVideoError(f"steps must be at least 1, got {num_steps}.")
    if not shift > 0:
        raise FastVideoError(f"shift must be > 0, got {shift}.")
    if name == "dmd":
        if sigmas is not None or spacing != "default":
            raise FastVideoError("scheduler 'dmd' runs its own timestep list (FastWan: 1000, 757, 522); explicit "
                                 "sigmas and spacing 'simple' need scheduler 'euler' or 'lcm'.")
        timesteps = DMD_TIMESTEPS if timesteps is None else tuple(timesteps)
        check_timesteps(timesteps)
        return FlowDMD(timesteps, generator)
    if timesteps is not None:
        raise FastVideoError(f"a timestep list is for scheduler 'dmd'; scheduler {name!r} takes steps or sigmas.")
    if name == "unipc":
        if sigmas is not None or spacing != "default":
            raise FastVideoError("scheduler 'unipc' follows diffusers' own spacing; explicit sigmas and spacing "
                                 "'simple' need scheduler 'euler' or 'lcm'.")
        return FlowUniPC(num_steps, shift)
    sig: np.ndarray | None
    if sigmas is not None:
        sig = np.asarray([float(s) for s in sigmas], dtype=np.float32)
    else:
        sig = simple_sigmas(num_steps, shift) if spacing == "simple" else None
    if name == "lcm":
        return FlowLCM(num_steps, shift, sig, generator)
    return FlowEuler(num_steps, shift, sig)
