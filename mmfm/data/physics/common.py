from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trajectory:
    fields: np.ndarray            # (T, C, *grid) float32
    channel_names: list
    grid_spacing: list            # one per grid axis
    time_step: float              # time between stored frames
    parameters: dict
    solver: str
    boundary_conditions: dict = field(default_factory=dict)
    dimensions: list = field(default_factory=list)

    def meta(self) -> dict:
        """The physics part of a sample's .json (docs/data.md)."""
        return {"channel_names": list(self.channel_names), "grid_spacing": [float(h) for h in self.grid_spacing],
                "time_step": float(self.time_step), "parameters": dict(self.parameters), "solver": self.solver,
                "boundary_conditions": dict(self.boundary_conditions), "dimensions": list(self.dimensions),
                "num_frames": int(self.fields.shape[0]), "grid_shape": list(self.fields.shape[2:])}
