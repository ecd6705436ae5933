"""One self-contained HTML page about a training run: curves, weight dynamics, representations, transfer, flags.

:func:`build_report` works only from the analyses' ``to_dict()`` records (or the result objects themselves) and the
checkpoints' metadata, so a report can be rebuilt from saved ``--json`` output without reading a tensor. The page
is one file: plots are PNGs embedded as ``data:`` URIs, styles are inline, there is no script, and a
Content-Security-Policy forbids every fetch, so it renders the same offline, attached to an email or in CI.

Every section shows what it has; a missing analysis (or a missing part of one: no per-block CKA, no spectral
statistics) is named with the reason, so a reader can tell "not computed" from "nothing to see". Plots are drawn on
private matplotlib ``Figure`` objects with the Agg canvas inside ``matplotlib.rc_context``: the global backend and
rcParams of the calling program are left as they were. See docs/report.md.

The package is in three layers, each importing only the ones before it:

- :mod:`.data`: the inputs checked, the run's points and axes, the metadata curves, :func:`report_json`;
- :mod:`.figures`: the matplotlib figures, as PNG bytes;
- :mod:`.page`: the HTML around them, :func:`build_report` and :func:`write_report`;
- :mod:`.run`: :func:`report_run`, what ``ckpt report`` does (run every analysis that applies, then the page), for
  library users.

>>> from ckptstore.analysis import open_trajectory
>>> from ckptstore.analysis.report import write_report
>>> traj = open_trajectory("run", store=store)  # doctest: +SKIP
>>> write_report(traj, "report.html", weights=analyze_weights(traj))  # doctest: +SKIP
"""

from ckptstore.analysis.report.data import REPORT_FORMAT, REPORT_VERSION, SECTIONS, ReportError, report_json
from ckptstore.analysis.report.figures import MAX_BLOCK_MAPS, MAX_HEATMAP_MODULES, MAX_METRIC_PANELS
from ckptstore.analysis.report.page import MAX_TABLE_ROWS, build_report, write_report

__all__ = [
    "MAX_BLOCK_MAPS",
    "MAX_HEATMAP_MODULES",
    "MAX_METRIC_PANELS",
    "MAX_TABLE_ROWS",
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "SECTIONS",
    "ReportError",
    "build_report",
    "report_json",
    "write_report",
]
