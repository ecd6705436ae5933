"""The Dask path: the per-tensor analyses as tasks on a LocalCluster of 2 workers, reading a store of the real
open_clip_train run on the moto S3 server, give the same JSON as the local path."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("moto")
pytest.importorskip("s3fs")
distributed = pytest.importorskip("distributed")

from ckptstore import create_store, open_store  # noqa: E402
from ckptstore.analysis.distributed import analyze_on_dask  # noqa: E402
from ckptstore.analysis.optimizer import analyze_optimizer  # noqa: E402
from ckptstore.analysis.plasticity import analyze_plasticity  # noqa: E402
from ckptstore.analysis.trajectory import StoreTrajectory  # noqa: E402
from ckptstore.testing.s3 import moto_buckets  # noqa: E402

BUCKET = "ckpt-dask"


def _same(a: Any, b: Any, path: str = "") -> None:
    """Equal structure; numbers within 1e-9 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def s3_run() -> Iterator[tuple[str, dict[str, Any]]]:
    pytest.importorskip("open_clip")
    from ckptstore.demo import trajectory as tj
    from ckptstore.integrations.openclip import ingest

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    with moto_buckets(BUCKET) as server:
        url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
        opts = server.storage_options()
        ingest(create_store(url, storage_options=opts), [ckpts], run="tiny")
        yield url, opts


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    # processes=False: two worker threads' event loops in this process (worker processes cost ~10 s to start here
    # and could not reach the in-process moto server's patched credentials without extra plumbing)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c,
        distributed.Client(c) as cl,
    ):
        yield cl


@pytest.mark.slow
def test_optimizer_on_dask_matches_local(s3_run: tuple[str, dict[str, Any]], client: Any) -> None:
    url, opts = s3_run
    local = analyze_optimizer(StoreTrajectory(open_store(url, storage_options=opts), "tiny")).to_dict()
    calls: list[tuple[int, int]] = []
    remote = analyze_on_dask("optimizer", url, "tiny", address=client, storage_options=opts,
                             progress=lambda d, t: calls.append((d, t))).to_dict()  # fmt: skip
    _same(local, remote)
    assert json.dumps(local, allow_nan=False)
    assert calls[-1] == (86, 86)
    assert len(client.scheduler_info()["workers"]) == 2


@pytest.mark.slow
def test_plasticity_on_dask_matches_local(s3_run: tuple[str, dict[str, Any]], client: Any) -> None:
    url, opts = s3_run
    local = analyze_plasticity(StoreTrajectory(open_store(url, storage_options=opts), "tiny"), dormant=False)
    remote = analyze_on_dask("plasticity", url, "tiny", address=client, storage_options=opts)
    _same(local.to_dict(), remote.to_dict())
    assert remote.to_dict()["weights"]["visual.conv1.weight"]["stable_rank"][0] > 1
