"""The demo corpus' solvers against properties they must have."""
import numpy as np

from mmfm.data.physics import solve_burgers_1d, solve_heat_2d, solve_navier_stokes_2d
from mmfm.data.physics.navier_stokes import SpectralGrid, kinetic_energy, random_vorticity


def test_heat_fourier_mode_decays_at_the_analytic_rate():
    n, kappa, t_end = 64, 0.01, 0.5
    x = np.arange(n) / n
    X, Y = np.meshgrid(x, x, indexing="ij")
    kx, ky = 2 * np.pi * 2, 2 * np.pi * 1
    traj = solve_heat_2d(np.sin(kx * X) * np.cos(ky * Y), kappa, t_end, n_frames=6)
    u = traj.fields[:, 0].astype(np.float64)
    amplitude = np.array([np.abs(np.fft.fft2(f)[2, 1]) for f in u])
    t = np.arange(6) * traj.time_step
    measured_rate = -np.polyfit(t, np.log(amplitude), 1)[0]
    analytic_rate = kappa * (kx**2 + ky**2)
    assert abs(measured_rate - analytic_rate) / analytic_rate < 0.01
    assert traj.fields.shape == (6, 1, n, n) and traj.channel_names == ["temperature"]


def test_burgers_conserves_the_mean_and_stays_bounded():
    n = 256
    x = np.arange(n) / n
    u0 = 0.3 + np.sin(2 * np.pi * x) + 0.5 * np.sin(4 * np.pi * x + 1)
    traj = solve_burgers_1d(u0, nu=0.002, t_end=0.6, n_frames=7)  # a shock forms at t ~ 0.2
    u = traj.fields[:, 0].astype(np.float64)
    means = u.mean(axis=1)
    assert np.abs(means - u0.mean()).max() < 1e-6  # float32 storage; the float64 solve is exact to 1e-15
    assert np.isfinite(u).all() and np.abs(u).max() <= np.abs(u0).max() + 1e-6
    tv = np.abs(np.diff(u, axis=1, append=u[:, :1])).sum(axis=1)
    assert (np.diff(tv) <= 1e-5).all()


def test_navier_stokes_energy_decays_and_velocity_is_divergence_free():
    n = 64
    w0 = random_vorticity(n, np.random.default_rng(0))
    traj = solve_navier_stokes_2d(w0, nu=1e-3, t_end=1.0, n_frames=5)
    w, ux, uy = (traj.fields[:, c].astype(np.float64) for c in range(3))
    energy = [kinetic_energy(f) for f in w]
    assert all(b < a for a, b in zip(energy, energy[1:]))
    assert np.allclose(energy, 0.5 * (ux**2 + uy**2).mean(axis=(1, 2)), rtol=1e-4)
    grid = SpectralGrid(n)
    for fx, fy in zip(ux, uy):
        div = np.fft.irfft2(1j * grid.kx * np.fft.rfft2(fx) + 1j * grid.ky * np.fft.rfft2(fy), s=(n, n))
        assert np.abs(div).max() < 2e-5 * np.abs(fx).max()  # float32 round-off; |grad u| is ~10 |u| here
    assert traj.channel_names == ["vorticity", "u_x", "u_y"] and traj.meta()["boundary_conditions"]["x"] == "periodic"
