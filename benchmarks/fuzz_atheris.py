"""Coverage-guided fuzzing (atheris: libFuzzer for Python) of the parsers that take untrusted text or bytes in
process: ref strings, ``--where``/``--sort``/``--columns`` texts, committed manifests (checksum, JSON, every
field's check) and the settings of ``ckptstore.json`` (issue 14, item 3). It complements
``benchmarks/fuzz_inputs.py`` (seeded structural mutation of whole files through the real entry points, in
sandboxed children): libFuzzer grows its inputs from the branches they reach. Anything but a library error
(``ckptstore.errors``) stops the run with the input written to ``crash-*``.

atheris is not a dependency of ckptstore (it builds against libFuzzer); install it to run this:

    pip install atheris
    PYTHONPATH=src python benchmarks/fuzz_atheris.py -runs=200000 -max_len=4096 -rss_limit_mb=2048 -timeout=10
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable

try:
    import atheris
except ImportError:  # pragma: no cover - the benchmark says what it needs
    sys.exit("benchmarks/fuzz_atheris.py needs atheris: pip install atheris (benchmarks/fuzz_inputs.py does not)")

with atheris.instrument_imports(include=["ckptstore"]):
    from ckptstore import query, refs
    from ckptstore.errors import CkptStoreError
    from ckptstore.format.manifest import Manifest, parse_manifest
    from ckptstore.store import store_settings


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass") if data.isascii() else data.decode("latin-1")


def _manifest(data: bytes) -> None:
    Manifest(parse_manifest(data, "runs/r/1.json"), "runs/r/1.json")


def _settings(data: bytes) -> None:
    try:
        info = json.loads(data)  # the Store refuses what json refuses (tested elsewhere); fuzz what it accepts
    except (ValueError, RecursionError):
        return
    if isinstance(info, dict):
        store_settings(info)


TARGETS: list[Callable[[bytes], object]] = [
    lambda d: refs.parse_ref(_text(d)),
    lambda d: query.parse_where(_text(d))({"metadata": {"epoch": 1, "metrics": {"loss": 0.5}}, "step": 3}),
    lambda d: query.parse_sort(_text(d)),
    lambda d: query.parse_columns(_text(d)),
    _manifest,
    _settings,
]


def one_input(data: bytes) -> None:
    if not data:
        return
    with contextlib.suppress(CkptStoreError):
        TARGETS[data[0] % len(TARGETS)](data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
