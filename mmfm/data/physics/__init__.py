"""Numerical solvers for the physics part of the demo corpus, written in numpy.

Each solver returns a `Trajectory`: stored frames (T, C, *grid), channel names, grid spacing,
the time between stored frames and the parameters: what a physics sample's .npz and .json hold.
  heat.py           2D heat equation, periodic, explicit finite differences
  burgers.py        1D viscous Burgers, periodic, conservative finite volumes, SSP-RK2
  navier_stokes.py  2D incompressible Navier-Stokes in vorticity form, pseudo-spectral, RK4
tests/test_data_physics.py checks each against a known property.
"""
from mmfm.data.physics.common import Trajectory  # noqa: F401
from mmfm.data.physics.heat import solve_heat_2d  # noqa: F401
from mmfm.data.physics.burgers import solve_burgers_1d  # noqa: F401
from mmfm.data.physics.navier_stokes import solve_navier_stokes_2d  # noqa: F401
