"""Flow-matching time grids and ODE solvers for the denoising loop (spec C; the non-default knobs, from
the users' seed 004, are the cache issue's denoising variants).

t = 1 is noise, t = 0 is actions. The default, linear + euler, is openpi's sampler bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from policies.pi05.configuration import SCHEDULES, SOLVERS


def time_grid(num_steps: int, schedule: str) -> tuple[list[Tensor], list[Tensor]]:
    """Flow times t_k and steps dt_k (float32 scalars) for t going from 1 (noise) to 0 (actions).

    linear: exactly openpi's loop, t_{k+1} = t_k + dt with dt = -1/num_steps accumulated in float32, so the
    last t is ~0 up to rounding and every step uses the same dt. The other schedules place t_k = s(k/N) and
    use dt_k = t_{k+1} - t_k, ending exactly at 0:
      cosine    t = 1 - sin(pi/2 * s)          (small steps near t = 0)
      quadratic t = (1 - s)^2                  (small steps near t = 0)
      sigmoid   t = 1 - normalised sigmoid(6 (s - 1/2))   (small steps at both ends)
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "linear":
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
        t = torch.tensor(1.0, dtype=torch.float32)
        times, steps = [], []
        for _ in range(num_steps):
            times.append(t)
            steps.append(dt)
            t = t + dt
        return times, steps
    s = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if schedule == "cosine":
        grid = 1.0 - torch.sin(0.5 * math.pi * s)
    elif schedule == "quadratic":
        grid = (1.0 - s) ** 2
    else:  # sigmoid
        k = 6.0
        lo, hi = torch.sigmoid(torch.tensor(-k / 2)), torch.sigmoid(torch.tensor(k / 2))
        grid = 1.0 - (torch.sigmoid(k * (s - 0.5)) - lo) / (hi - lo)
    grid[0], grid[-1] = 1.0, 0.0
    grid32 = grid.to(torch.float32)
    return [grid32[i] for i in range(num_steps)], [grid32[i + 1] - grid32[i] for i in range(num_steps)]


# velocity evaluations per step of each solver (DenoiseResult.times has num_steps * this many entries)
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "dpm_solver_2": 1, "rk4": 4}

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, H, A], t: 0-dim float32 tensor) -> v [B, H, A]


def integrate(velocity: VelocityFn, noise: Tensor, num_steps: int, schedule: str, solver: str) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 to 0.

    euler (1 evaluation/step, openpi), midpoint and heun (2), rk4 (4), dpm_solver_2 = DPM-Solver++(2M) in
    data-prediction form for the rectified-flow path x_t = t*noise + (1-t)*x0 (1 evaluation/step). Its first
    step and its last step (to t = 0, an infinite step in lambda) are first order, where it equals Euler;
    so with the linear grid the last step limits it to first order, while cosine/quadratic grids (last
    t = O(1/N^2)) keep second order.
    """
    # noise: [B, H, A] float32 -> [B, H, A] float32
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    times, steps = time_grid(num_steps, schedule)
    x = noise
    prev: tuple[float, Tensor] | None = None  # dpm_solver_2: (t, x0 prediction) of the previous step

    def f(x_t: Tensor, t_eval: float) -> Tensor:
        return velocity(x_t, torch.tensor(t_eval, dtype=torch.float32))

    # t, dt are float32 values (openpi's grid) held as Python floats: `x + dt * v` on a float32 x is then
    # exactly openpi's float32 update, and the solver coefficients keep float64 precision.
    for t, dt in zip(map(float, times), map(float, steps), strict=True):
        if solver == "euler":
            x = x + dt * f(x, t)
        elif solver == "midpoint":
            v1 = f(x, t)
            x = x + dt * f(x + (dt / 2) * v1, t + dt / 2)
        elif solver == "heun":
            v1 = f(x, t)
            v2 = f(x + dt * v1, t + dt)
            x = x + (dt / 2) * (v1 + v2)
        elif solver == "rk4":
            k1 = f(x, t)
            k2 = f(x + (dt / 2) * k1, t + dt / 2)
            k3 = f(x + (dt / 2) * k2, t + dt / 2)
            k4 = f(x + dt * k3, t + dt)
            x = x + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            x, prev = _dpm_solver_2m_step(f, x, t, dt, prev)
    return x


def _dpm_solver_2m_step(
    f: Callable[[Tensor, float], Tensor], x: Tensor, t: float, dt: float, prev: tuple[float, Tensor] | None
) -> tuple[Tensor, tuple[float, Tensor]]:
    """One DPM-Solver++(2M) step, alpha_t = 1 - t, sigma_t = t, lambda = log(alpha / sigma)."""
    v = f(x, t)
    t_next = t + dt
    x0 = x - t * v
    if prev is None or prev[0] >= 1.0 or t_next <= 0.0:
        # First order: DDIM in data prediction, identical to an Euler step on this path.
        return x + dt * v, (t, x0)
    lam = lambda u: math.log((1.0 - u) / u)  # noqa: E731
    h = lam(t_next) - lam(t)
    r = (lam(t) - lam(prev[0])) / h
    d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev[1]
    x_next = (t_next / t) * x - (1.0 - t_next) * math.expm1(-h) * d
    return x_next, (t, x0)
