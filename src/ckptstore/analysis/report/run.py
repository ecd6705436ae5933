"""What ``ckpt report`` does, for library users: run every analysis that applies to a run, then the page.

>>> from ckptstore.analysis.report.run import report_run
>>> report = report_run(store, "run-1", spectral=False)  # doctest: +SKIP
>>> report.write("report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptstore.errors import CkptStoreError

if TYPE_CHECKING:
    from ckptstore.analysis.trajectory import Trajectory
    from ckptstore.store import Store

# A stage name -> a context manager yielding a ``(done, total)`` callback (``ckpt report`` passes a rich bar).
ProgressFactory = Callable[[str], AbstractContextManager[Callable[[int, int], None]]]
# A stage description -> a context manager around that stage (``ckpt report`` prints a line when it starts and ends).
StageFactory = Callable[[str], AbstractContextManager[None]]

# Weight names every open_clip CLIP model has (after ``module.`` is stripped): a vision tower and a text tower.
_CLIP_MARKERS = (("visual.",), ("token_embedding.weight", "text.token_embedding.weight"))


@contextmanager
def _no_progress(_stage: str) -> Iterator[Callable[[int, int], None]]:
    yield lambda done, total: None


@contextmanager
def _no_stage(_what: str) -> Iterator[None]:
    yield


@dataclass
class RunReport:
    """The analyses of one run (each as its ``to_dict()``) and, for each one not run, the reason."""

    traj: Trajectory
    results: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    title: str | None = None

    extra: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def _kwargs(self) -> dict[str, Any]:
        return {**self.results, "title": self.title, "skipped": self.skipped, "extra": self.extra}

    def json(self) -> dict[str, Any]:
        """The report as one JSON-ready dict (:func:`~ckptstore.analysis.report.report_json`)."""
        from ckptstore.analysis.report.data import report_json

        return report_json(self.traj, **self._kwargs())

    def html(self) -> str:
        """The report as one self-contained HTML page (:func:`~ckptstore.analysis.report.build_report`)."""
        from ckptstore.analysis.report.page import build_report

        return build_report(self.traj, **self._kwargs())

    def write(self, path: str | os.PathLike[str]) -> Path:
        """The page written atomically to ``path`` (:func:`~ckptstore.analysis.report.write_report`)."""
        from ckptstore.analysis.report.page import write_report

        return write_report(self.traj, path, **self._kwargs())


def open_run(store: Store | None, run: str) -> Trajectory:
    """A folder or ``.pt`` file given as ``run`` is read from disk; anything else is a run of ``store``."""
    from ckptstore.analysis.trajectory import StoreTrajectory, open_trajectory

    if Path(run).exists():
        return open_trajectory(run)
    if store is None:
        raise CkptStoreError(f"{run!r} is not a file or folder, and no store was given to read it from")
    return StoreTrajectory(store, run)


def clip_model_config(traj: Trajectory, given: str | None) -> dict[str, Any]:
    """The open_clip config to build the run's model with, or a :class:`CkptStoreError` saying why there is none."""
    from ckptstore.analysis.representations import RepresentationError, model_config_for

    names = traj.weight_names()
    for options in _CLIP_MARKERS:
        if not any(n.startswith(o) for n in names for o in options):
            raise RepresentationError(
                "not an OpenCLIP model (no vision tower 'visual.*' and text tower 'token_embedding' among its weights)",
                hint="representations and transfer need an open_clip CLIP model",
            )
    cfg, _source = model_config_for(traj.points[0], given)
    return cfg


def section_note(exc: BaseException) -> str:
    """One line saying why a report section was not computed: the library's own message, else the error's type
    and first line (a raw ``OSError`` keeps its file name)."""
    if isinstance(exc, CkptStoreError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _skipped_sections(
    traj: Trajectory,
    representations: bool,
    transfer: bool,
    model_config: str | None,
    stage: StageFactory,
    lean_imports: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The model config (``None`` when neither model section runs) and the model sections that will not run."""
    skipped: dict[str, str] = {}
    cfg: dict[str, Any] | None = None
    if representations or transfer:
        try:
            with stage("the model's config (imports open_clip)"):
                cfg = clip_model_config(traj, model_config)
                if lean_imports:
                    from ckptstore.analysis.representations import import_open_clip_for

                    import_open_clip_for(cfg)
        except Exception as exc:  # a section that cannot run is a note, never a failed report
            for section in ("representations", "transfer"):
                skipped[section] = section_note(exc)
    if not representations:
        skipped["representations"] = "skipped (--no-representations)"
    if not transfer:
        skipped["transfer"] = "skipped (--no-transfer)"
    return cfg, skipped


def analyze_run(
    traj: Trajectory,
    *,
    probe: str = "digits",
    representations: bool = True,
    transfer: bool = True,
    spectral: bool = True,
    model_config: str | None = None,
    progress: ProgressFactory | None = None,
    stage: StageFactory | None = None,
    lean_imports: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each analysis that applies, as its ``to_dict()``; and, for each one not run, the reason.

    Representations and transfer need the run's model: an OpenCLIP CLIP model whose config can be found. When it
    cannot, both are skipped with the reason. Both use the ``probe`` set (transfer: a linear probe on a seeded,
    stratified split of its labelled images). A probe that cannot be read is an error (the user asked for it).
    ``lean_imports`` imports open_clip without the optional libraries the run's model does not use
    (:func:`~ckptstore.analysis.representations.import_open_clip_for`): for a process that builds no other
    open_clip model, such as ``ckpt report``.
    """
    from ckptstore.analysis.stability import analyze_stability
    from ckptstore.analysis.weights import analyze_weights

    bar = progress or _no_progress
    step = stage or _no_stage
    with step("weight dynamics"), bar("weights") as prog:
        weights = analyze_weights(traj, spectral=spectral, progress=prog)
    cfg, skipped = _skipped_sections(traj, representations, transfer, model_config, step, lean_imports)

    probe_set = None
    if "representations" not in skipped or "transfer" not in skipped:
        from ckptstore.analysis.probes import load_probe

        with step(f"the probe set ({probe})"):
            probe_set = load_probe(probe)

    results: dict[str, Any] = {"weights": weights.to_dict()}
    if probe_set is not None and "representations" not in skipped:
        from ckptstore.analysis.representations import analyze_representations

        try:
            with step("representations"), bar("representations") as prog:
                results["representations"] = analyze_representations(
                    traj, probe_set, model_config=cfg, progress=prog
                ).to_dict()
        except Exception as exc:  # see _skipped_sections
            skipped["representations"] = section_note(exc)

    if probe_set is not None and "transfer" not in skipped:
        from ckptstore.analysis.transfer import analyze_transfer

        try:
            with step("transfer"), bar("transfer") as prog:
                results["transfer"] = analyze_transfer(traj, probe_set, model_config=cfg, progress=prog).to_dict()
        except Exception as exc:  # e.g. a probe CSV without labels: the page says so
            skipped["transfer"] = section_note(exc)
    # Stability reads the weight series (not recomputed) and the embeddings' effective dimension.
    with step("stability"):
        stability = analyze_stability(traj, weights=weights, representations=results.get("representations"))
    results["stability"] = stability.to_dict()
    return results, skipped


EXTRA_SECTIONS = ("averages", "interpolation", "optimizer", "plasticity")


def extra_sections(
    traj: Trajectory,
    wanted: Sequence[str],
    *,
    probe: str = "digits",
    model_config: str | None = None,
    progress: ProgressFactory | None = None,
    stage: StageFactory | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The optional sections (``ckpt report --with``), each as its ``to_dict()``; and why any of them was not run.

    Interpolation takes the first, middle and last checkpoints (7 points per line); averages and the optimizer need
    a store run; dormant units need an OpenCLIP run (otherwise plasticity reports the weights only, and says so).
    ``"all"`` in ``wanted`` means every one of :data:`EXTRA_SECTIONS`."""
    from ckptstore.analysis.trajectory import StoreTrajectory

    chosen = set(EXTRA_SECTIONS) if "all" in wanted else set(wanted)
    unknown = chosen - set(EXTRA_SECTIONS)
    if unknown:
        raise CkptStoreError(
            f"unknown report section(s): {', '.join(sorted(unknown))}", hint=f"choose from {EXTRA_SECTIONS}"
        )
    bar, step = progress or _no_progress, stage or _no_stage
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}
    probe_set: Any = None

    def get_probe() -> Any:
        nonlocal probe_set
        if probe_set is None:
            from ckptstore.analysis.probes import load_probe

            probe_set = load_probe(probe)
        return probe_set

    for name in EXTRA_SECTIONS:
        if name not in chosen:
            continue
        try:
            with step(name), bar(name) as prog:
                if name == "optimizer":
                    from ckptstore.analysis.optimizer import analyze_optimizer

                    out[name] = analyze_optimizer(traj, progress=prog).to_dict()
                elif name == "averages":
                    from ckptstore.analysis.averages import analyze_averages

                    if not isinstance(traj, StoreTrajectory):
                        raise CkptStoreError("averages read a store run", hint="`ckpt ingest` the files first")
                    out[name] = analyze_averages(
                        traj.store, traj.run, probe=get_probe(), model_config=model_config, progress=prog
                    )
                elif name == "interpolation":
                    from ckptstore.analysis.interpolation import analyze_interpolation

                    n = len(traj)
                    ends = sorted({0, n // 2, n - 1})
                    pairs = [(a, b) for i, a in enumerate(ends) for b in ends[i + 1 :]]
                    out[name] = analyze_interpolation(
                        traj, pairs, points=7, probe=get_probe(), model_config=model_config, progress=prog
                    ).to_dict()
                else:
                    from ckptstore.analysis.plasticity import analyze_plasticity

                    try:
                        out[name] = analyze_plasticity(
                            traj, probe=get_probe(), model_config=model_config, progress=prog
                        ).to_dict()
                    except CkptStoreError as exc:
                        notes[name] = f"plasticity without dormant units: {exc}"
                        out[name] = analyze_plasticity(traj, dormant=False, progress=prog).to_dict()
        except Exception as exc:  # see _skipped_sections
            notes[name] = f"no {name}: {section_note(exc)}"
    return out, notes


def report_run(
    store: Store | None,
    run: str,
    *,
    probe: str = "digits",
    representations: bool = True,
    transfer: bool = True,
    spectral: bool = True,
    model_config: str | None = None,
    title: str | None = None,
    progress: ProgressFactory | None = None,
    stage: StageFactory | None = None,
    extra: Sequence[str] = (),
    lean_imports: bool = False,
) -> RunReport:
    """``ckpt report`` as a function: ``run`` of ``store`` (or a folder / ``.pt`` file of open_clip_train
    checkpoints, then ``store`` may be ``None``), every analysis that applies, ready for ``.html()``, ``.json()`` or
    ``.write(path)``. ``extra`` names optional sections to add (:data:`EXTRA_SECTIONS`, or ``"all"``); a one-line
    note for each one that could not be run (fully) is in ``RunReport.notes``. ``lean_imports``: see
    :func:`analyze_run`."""
    traj = open_run(store, run)
    results, skipped = analyze_run(
        traj,
        probe=probe,
        representations=representations,
        transfer=transfer,
        spectral=spectral,
        model_config=model_config,
        progress=progress,
        stage=stage,
        lean_imports=lean_imports,
    )
    sections: dict[str, Any] = {}
    notes: dict[str, str] = {}
    if extra:
        sections, notes = extra_sections(
            traj, extra, probe=probe, model_config=model_config, progress=progress, stage=stage
        )
    return RunReport(traj, results, skipped, title, sections, notes)


def summary_line(blob: Mapping[str, Any]) -> str:
    """One line: the run, how many checkpoints, what was analysed, flags, best transfer checkpoint."""
    bits = [f"{blob['run']}: {len(blob['points'])} checkpoints"]
    stab = blob.get("stability")
    if stab:
        flags = stab.get("flags") or []
        high = sum(1 for f in flags if f.get("confidence") == "high")
        bits.append(
            f"{len(flags)} stability flag{'s' if len(flags) != 1 else ''}" + (f" ({high} high)" if high else "")
        )
    tr = blob.get("transfer")
    best = (tr or {}).get("best") or {}
    if isinstance(best.get("accuracy"), int | float):
        bits.append(f"best transfer accuracy {best['accuracy']:.3f} at {best.get('label')}")
    done = [k for k in ("weights", "representations", "transfer", "stability") if blob.get(k) is not None]
    bits.append("analysed: " + ", ".join(done))
    if blob.get("skipped"):
        bits.append("skipped: " + ", ".join(blob["skipped"]))
    return "; ".join(bits)
