"""Real-time chunking (RTC) guidance: denoise a new chunk as an inpainting of the chunk still executing.

Black et al. 2025, *Real-Time Execution of Action Chunking Flow Policies* (Physical Intelligence), as
LeRobot 0.6.1 implements it (`lerobot/policies/rtc/modeling_rtc.py`, `RTCProcessor.denoise_step`), in this
repo's time convention (t = 1 noise, t = 0 actions; the paper's tau = 1 - t). At every velocity evaluation:

    v          = v(x_t, t)                              the model's velocity
    x0_hat     = x_t - t v                              the actions it predicts
    e          = W * (Y - x0_hat)                       Y: the leftover chunk, W: prefix weights [H]
    correction = e                                      jacobian "identity" (LeRobot 0.6.1: v is computed
                                                        before x_t enters autograd, so d x0_hat / d x_t = I)
               = e^T d x0_hat / d x_t                   jacobian "model" (the paper's Algorithm 1 and PI's
                                                        Kinetix code: a VJP through the velocity network)
    w(t)       = min(beta, c / r^2),  c = (1 - tau) / tau,  1 / r^2 = ((1 - tau)^2 + tau^2) / (1 - tau)^2
    v_guided   = v - w(t) correction                    (the sampler's dt < 0 moves x towards Y)

Prefix weights over the new chunk's H actions (`prefix_weights`, LeRobot's `get_prefix_weights` with
start = the inference delay d, end = min(execution horizon, leftover length)): 1 on the first d actions
(they are executed from the old chunk whatever the new one says), a decay towards 0 on [d, end) (linear,
or exp: w * expm1(w) / (e - 1)), 0 from `end` on; `zeros` keeps only the leading ones, `ones` is 1 up to
`end`. The leftover Y is right-padded with zeros to [H, A] (LeRobot pads the unpadded robot actions back
to the model's action width).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

RTC_SCHEDULES = ("zeros", "ones", "linear", "exp")  # LeRobot's RTCAttentionSchedule, lower case
JACOBIANS = ("identity", "model")


def prefix_weights(schedule: str, delay: int, end: int, total: int) -> Tensor:
    """Guidance weight of each of the new chunk's `total` actions ([total] float32; module docstring)."""
    if schedule not in RTC_SCHEDULES:
        raise ValueError(f"rtc schedule {schedule!r}: expected one of {', '.join(RTC_SCHEDULES)}")
    start = min(delay, end)
    if schedule == "zeros":
        weights = torch.zeros(total)
        weights[:start] = 1.0
        return weights
    if schedule == "ones":
        weights = torch.ones(total)
        weights[end:] = 0.0
        return weights
    steps = total - max(total - end, 0) - start
    decay = torch.linspace(1, 0, steps + 2)[1:-1] if end > start and steps > 0 else torch.zeros(0)
    if schedule == "exp":
        decay = decay * torch.expm1(decay).div(math.e - 1)
    return torch.cat([torch.ones(min(start, total)), decay, torch.zeros(max(total - end, 0))])


def guidance_weight(t: float, max_weight: float) -> Tensor:
    """w(t) = min(beta, (1 - tau) / tau * ((1 - tau)^2 + tau^2) / (1 - tau)^2), tau = 1 - t, in float32
    as LeRobot computes it (its infinities at tau = 0 and 1 become beta)."""
    beta = torch.as_tensor(max_weight, dtype=torch.float32)
    tau = torch.as_tensor(1.0 - t, dtype=torch.float32)
    inv_r2 = ((1 - tau) ** 2 + tau**2) / (1 - tau) ** 2
    c = torch.nan_to_num((1 - tau) / tau, posinf=float(beta))
    return torch.minimum(torch.nan_to_num(c * inv_r2, posinf=float(beta)), beta)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What one guided denoising run inpaints towards: per row, the leftover chunk and its weights."""

    target: Tensor  # [B, H, A] leftover actions (model space, zero-padded)
    weights: Tensor  # [B, H, 1] prefix weights
    max_weight: float  # beta
    jacobian: str = "identity"

    def __post_init__(self) -> None:
        if self.jacobian not in JACOBIANS:
            raise ValueError(f"rtc jacobian {self.jacobian!r}: expected one of {', '.join(JACOBIANS)}")
        if self.target.ndim != 3 or self.weights.shape != (*self.target.shape[:2], 1):
            raise ValueError(f"guidance target {tuple(self.target.shape)} / weights {tuple(self.weights.shape)}: "
                             "expected [B, H, A] and [B, H, 1]")

    @staticmethod
    def concat(parts: list[Guidance]) -> Guidance:
        first = parts[0]
        if len(parts) == 1:
            return first
        return Guidance(torch.cat([p.target for p in parts]), torch.cat([p.weights for p in parts]),
                        first.max_weight, first.jacobian)

    def to(self, device: torch.device, dtype: torch.dtype) -> Guidance:
        return Guidance(self.target.to(device, dtype), self.weights.to(device, dtype), self.max_weight, self.jacobian)


def guided_velocity(velocity: Callable[[Tensor], Tensor], x_t: Tensor, t: float, guidance: Guidance) -> Tensor:
    """v_guided at (x_t, t) from the unguided `velocity(x)` (module docstring). The `model` jacobian runs
    `velocity` under autograd (outside inference mode): everything it reads must be a normal tensor."""
    # x_t: [B, H, A] -> [B, H, A]
    if guidance.jacobian == "identity":
        v = velocity(x_t)
        correction = (guidance.target - (x_t - t * v)) * guidance.weights
    else:
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            v = velocity(x)
            x0_hat = x - t * v
            with torch.no_grad():  # the error is a constant of the VJP (and its inputs may be inference tensors)
                error = (guidance.target - x0_hat) * guidance.weights
            (correction,) = torch.autograd.grad(x0_hat, x, error)
        v = v.detach()
    return v - guidance_weight(t, guidance.max_weight).to(v.device, v.dtype) * correction
