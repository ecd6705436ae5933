"""Research answers from a stored run: weight dynamics, representation evolution, stability, transfer, reports.

Each analysis reads a :class:`~ckptstore.analysis.trajectory.Trajectory` (a store run, ``.pt`` files, or state dicts
in memory) tensor by tensor and returns a result with ``to_dict()`` for JSON. Importing this package does not import
torch.
"""

from ckptstore.analysis.trajectory import (
    FileTrajectory,
    MemoryTrajectory,
    Point,
    StoreTrajectory,
    Trajectory,
    TrajectoryError,
    open_trajectory,
)

__all__ = [
    "FileTrajectory",
    "MemoryTrajectory",
    "Point",
    "StoreTrajectory",
    "Trajectory",
    "TrajectoryError",
    "open_trajectory",
]
