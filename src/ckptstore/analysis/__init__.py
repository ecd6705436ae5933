"""Research answers from a stored run: weight dynamics, representation evolution, stability, transfer, reports.

Each analysis reads a :class:`~ckptstore.analysis.trajectory.Trajectory` (a store run, ``.pt`` files, or state dicts
in memory) tensor by tensor and returns a result with ``to_dict()`` for JSON (docs/analysis-dynamics.md,
docs/analysis-representations.md, docs/report.md).
Importing this package does not import torch, open_clip, scikit-learn or matplotlib; the analyses that need them
import them when they run.

>>> from ckptstore.analysis import StoreTrajectory, analyze_weights, analyze_stability, write_report
>>> traj = StoreTrajectory(store, "my-run")                          # doctest: +SKIP
>>> dyn = analyze_weights(traj)                                       # doctest: +SKIP
>>> write_report(traj, "report.html", weights=dyn, stability=analyze_stability(traj, weights=dyn))  # doctest: +SKIP
"""

from ckptstore.analysis.averages import analyze_averages, average_checkpoints
from ckptstore.analysis.cka import cka_matrix, linear_cka
from ckptstore.analysis.distributed import analyze_on_dask
from ckptstore.analysis.interpolation import Interpolation, analyze_interpolation
from ckptstore.analysis.optimizer import OptimizerReport, OptimizerThresholds, analyze_optimizer
from ckptstore.analysis.plasticity import Plasticity, analyze_plasticity
from ckptstore.analysis.probes import ProbeSet, digits_probe, folder_probe, load_probe
from ckptstore.analysis.report import build_report, report_json, write_report
from ckptstore.analysis.representations import (
    RepresentationEvolution,
    analyze_module_representations,
    analyze_representations,
)
from ckptstore.analysis.stability import Flag, StabilityReport, StabilityThresholds, analyze_stability
from ckptstore.analysis.trajectory import (
    FileTrajectory,
    MemoryTrajectory,
    Point,
    StoreTrajectory,
    Trajectory,
    TrajectoryError,
    open_trajectory,
)
from ckptstore.analysis.transfer import TransferResult, analyze_transfer
from ckptstore.analysis.weights import WeightDynamics, analyze_weights

__all__ = [
    "FileTrajectory",
    "Flag",
    "Interpolation",
    "MemoryTrajectory",
    "OptimizerReport",
    "OptimizerThresholds",
    "Plasticity",
    "Point",
    "ProbeSet",
    "RepresentationEvolution",
    "StabilityReport",
    "StabilityThresholds",
    "StoreTrajectory",
    "Trajectory",
    "TrajectoryError",
    "TransferResult",
    "WeightDynamics",
    "analyze_averages",
    "analyze_interpolation",
    "analyze_module_representations",
    "analyze_on_dask",
    "analyze_optimizer",
    "analyze_plasticity",
    "analyze_representations",
    "analyze_stability",
    "analyze_transfer",
    "analyze_weights",
    "average_checkpoints",
    "build_report",
    "cka_matrix",
    "digits_probe",
    "folder_probe",
    "linear_cka",
    "load_probe",
    "open_trajectory",
    "report_json",
    "write_report",
]
