"""2D heat equation u_t = kappa * (u_xx + u_yy) on a periodic square [0, L)^2.

Explicit Euler in time, 5-point Laplacian in space. Stable for kappa*dt/h^2 <= 1/4; we take
`cfl` = kappa*dt/h^2 = 0.2 by default. A Fourier mode exp(i k.x) decays as exp(-kappa |k|^2 t)
in the continuous problem; on this grid its rate is kappa * (4/h^2) (sin^2(k_x h/2) + sin^2(k_y h/2)),
which agrees to O((kh)^2) (the test checks it).
"""
from __future__ import annotations

import numpy as np

from mmfm.data.physics.common import Trajectory


def laplacian_periodic(u: np.ndarray, h: float) -> np.ndarray:
    return (np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1) - 4 * u) / h**2


def solve_heat_2d(u0: np.ndarray, kappa: float, t_end: float, n_frames: int, length: float = 1.0,
                  cfl: float = 0.2) -> Trajectory:
    if u0.ndim != 2 or u0.shape[0] != u0.shape[1]:
        raise ValueError(f"u0 must be a square 2D grid, got shape {u0.shape}")
    if not 0 < cfl <= 0.25:
        raise ValueError(f"cfl (kappa*dt/h^2) must be in (0, 0.25] for stability, got {cfl}")
    n = u0.shape[0]
    h = length / n
    frame_dt = t_end / (n_frames - 1)
    steps_per_frame = max(1, int(np.ceil(frame_dt / (cfl * h * h / kappa))))
    dt = frame_dt / steps_per_frame
    u = u0.astype(np.float64).copy()
    frames = [u.copy()]
    for _ in range(n_frames - 1):
        for _ in range(steps_per_frame):
            u = u + dt * kappa * laplacian_periodic(u, h)
        frames.append(u.copy())
    return Trajectory(np.asarray(frames, np.float32)[:, None], ["temperature"], [h, h], frame_dt,
                      {"kappa": kappa, "length": length, "dt": dt}, "mmfm.data.physics.heat (FTCS, 5-point)",
                      {"x": "periodic", "y": "periodic"}, ["x", "y"])


def random_initial_condition(n: int, rng: np.random.Generator, modes: int = 4) -> np.ndarray:
    """A smooth random field: a few low Fourier modes with random amplitudes and phases."""
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    u = np.zeros((n, n))
    for kx in range(1, modes + 1):
        for ky in range(0, modes + 1):
            a, phase = rng.normal() / (kx * kx + ky * ky), rng.uniform(0, 2 * np.pi)
            u += a * np.cos(2 * np.pi * (kx * X + ky * Y) + phase)
    return u
