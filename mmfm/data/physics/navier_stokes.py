"""2D incompressible Navier-Stokes in vorticity form on the periodic square [0, 2 pi)^2:

    w_t + u . grad(w) = nu * lap(w) + f,     u = (psi_y, -psi_x),     lap(psi) = -w

Pseudo-spectral: derivatives in Fourier space, the product u . grad(w) in physical space with
the 2/3 rule against aliasing, classical RK4 in time with a CFL step. The velocity comes from
the stream function, so it is divergence-free by construction (to round-off; the test checks
it); without forcing the kinetic energy decays (the test checks that too).
"""
from __future__ import annotations

import numpy as np

from mmfm.data.physics.common import Trajectory


class SpectralGrid:
    def __init__(self, n: int):
        self.n = n
        k = np.fft.fftfreq(n, 1.0 / n)
        self.kx, self.ky = np.meshgrid(k, np.fft.rfftfreq(n, 1.0 / n), indexing="ij")
        self.k2 = self.kx**2 + self.ky**2
        self.inv_k2 = np.where(self.k2 > 0, 1.0 / np.where(self.k2 > 0, self.k2, 1.0), 0.0)
        cut = n // 3
        self.dealias = (np.abs(self.kx) <= cut) & (np.abs(self.ky) <= cut)

    def velocity_hat(self, w_hat):
        psi_hat = w_hat * self.inv_k2
        return 1j * self.ky * psi_hat, -1j * self.kx * psi_hat

    def velocity(self, w_hat):
        ux_hat, uy_hat = self.velocity_hat(w_hat)
        return np.fft.irfft2(ux_hat, s=(self.n, self.n)), np.fft.irfft2(uy_hat, s=(self.n, self.n))


def _rhs(w_hat, grid: SpectralGrid, nu: float, f_hat):
    n = grid.n
    ux, uy = grid.velocity(w_hat)
    wx = np.fft.irfft2(1j * grid.kx * w_hat, s=(n, n))
    wy = np.fft.irfft2(1j * grid.ky * w_hat, s=(n, n))
    adv_hat = np.fft.rfft2(ux * wx + uy * wy) * grid.dealias
    return -adv_hat - nu * grid.k2 * w_hat + f_hat


def kinetic_energy(w: np.ndarray) -> float:
    """Mean of |u|^2 / 2 for the velocity of vorticity w."""
    grid = SpectralGrid(w.shape[0])
    ux, uy = grid.velocity(np.fft.rfft2(w))
    return float(0.5 * np.mean(ux**2 + uy**2))


def solve_navier_stokes_2d(w0: np.ndarray, nu: float, t_end: float, n_frames: int, forcing: np.ndarray | None = None,
                           cfl: float = 0.5) -> Trajectory:
    if w0.ndim != 2 or w0.shape[0] != w0.shape[1]:
        raise ValueError(f"w0 must be a square 2D grid, got shape {w0.shape}")
    n = w0.shape[0]
    h = 2 * np.pi / n
    grid = SpectralGrid(n)
    w_hat = np.fft.rfft2(w0) * grid.dealias
    f_hat = np.fft.rfft2(forcing) if forcing is not None else 0.0
    frame_dt = t_end / (n_frames - 1)
    t, steps = 0.0, 0

    def frame():
        ux, uy = grid.velocity(w_hat)
        return np.stack([np.fft.irfft2(w_hat, s=(n, n)), ux, uy])

    frames = [frame()]
    for f in range(1, n_frames):
        t_target = f * frame_dt
        while t < t_target - 1e-14:
            ux, uy = grid.velocity(w_hat)
            umax = max(np.abs(ux).max(), np.abs(uy).max(), 1e-12)
            dt = min(cfl * h / umax, 0.5 * h * h / max(nu, 1e-12), t_target - t)
            k1 = _rhs(w_hat, grid, nu, f_hat)
            k2 = _rhs(w_hat + 0.5 * dt * k1, grid, nu, f_hat)
            k3 = _rhs(w_hat + 0.5 * dt * k2, grid, nu, f_hat)
            k4 = _rhs(w_hat + dt * k3, grid, nu, f_hat)
            w_hat = w_hat + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t += dt
            steps += 1
        frames.append(frame())
    return Trajectory(np.asarray(frames, np.float32), ["vorticity", "u_x", "u_y"], [h, h], frame_dt,
                      {"nu": nu, "forced": forcing is not None, "domain_length": 2 * np.pi, "steps": steps},
                      "mmfm.data.physics.navier_stokes (pseudo-spectral, 2/3 dealiasing, RK4)",
                      {"x": "periodic", "y": "periodic"}, ["x", "y"])


def random_vorticity(n: int, rng: np.random.Generator, k_peak: float = 4.0) -> np.ndarray:
    """A random smooth vorticity field with energy near wavenumber k_peak."""
    grid = SpectralGrid(n)
    k = np.sqrt(grid.k2)
    amp = k * np.exp(-((k / k_peak) ** 2)) * grid.dealias
    w_hat = amp * np.exp(2j * np.pi * rng.uniform(size=k.shape)) * n * n / 10
    w = np.fft.irfft2(w_hat, s=(n, n))
    return w / max(np.abs(w).max(), 1e-12) * 5.0
