"""The fsspec backend against a real S3 protocol server: moto's server mode on 127.0.0.1 (a free port), started
by a module fixture, with a fault-injecting front end (``ckptstore.testing.s3``) that answers 500s, drops
connections, cuts responses and logs the bytes each request moved.

* the storage conformance suite (``StorageTests`` from test_conformance.py) runs here on S3;
* end to end: save / load / load_tensor / list / delete / gc / verify on ``s3://``, from Python and the CLI;
* ``load_tensor`` transfers only that tensor's bytes (counted at the server);
* two writers committing the same checkpoint: exactly one wins, the other gets ``ConcurrentCommitError``;
* the lease lock: a second writer is refused, a stale lock is broken, a held lease is renewed;
* faults mid-upload and mid-download are retried, or end in a clear error, never a half-committed checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_conformance import StorageTests

from ckptstore.cli.main import main as ckpt_main
from ckptstore.errors import (
    CheckpointNotFoundError,
    ConcurrentCommitError,
    RemoteStorageError,
    StoreLockedError,
)
from ckptstore.format.spec import LOCK_FILE
from ckptstore.storage import Storage, open_storage
from ckptstore.storage.remote import FsspecStorage
from ckptstore.store import Store, create_store, open_store

pytest.importorskip("s3fs")
pytest.importorskip("moto")
from ckptstore.testing.s3 import MotoS3Server, moto_buckets

BUCKET = "ckpt-test"
MiB = 2**20
#: Fast retries for tests; S3's smallest part size, so that a few MiB already make a multipart upload.
FAST = {"backoff": 0.005, "max_backoff": 0.05, "part_size": 5 * MiB}


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoS3Server]:
    with moto_buckets(BUCKET) as server:
        yield server


@pytest.fixture
def server(moto_server: MotoS3Server) -> Iterator[MotoS3Server]:
    moto_server.faults.clear()
    yield moto_server
    moto_server.faults.clear()


@pytest.fixture
def url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def options(server: MotoS3Server, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return server.storage_options(**{**FAST, "cache_dir": str(tmp_path / "cache"), **extra})

    return make


def state(rng: np.random.Generator, n: int = 50_000, big: int = 0) -> dict[str, Any]:
    s: dict[str, Any] = {
        "model": {"w": rng.standard_normal((n // 100, 100)).astype(np.float32), "b": np.zeros(7, np.float32)},
        "step": 1,
    }
    if big:
        s["model"]["big"] = rng.standard_normal(big).astype(np.float32)
    return s


def nudge(s: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = {"model": dict(s["model"]), "step": s["step"] + 1}
    for k in ("w", "big"):
        if k in out["model"]:
            a = out["model"][k]
            out["model"][k] = (a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3).astype(np.float32)
    return out


def ckpt(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue()


def cli_options(server: MotoS3Server, tmp_path: Path) -> list[str]:
    return ["-o", f"endpoint_url={server.endpoint}", "-o", "key=testing", "-o", "secret=testing",
            "-o", f"cache_dir={tmp_path / 'cli-cache'}", "-o", "backoff=0.005"]  # fmt: skip


# ------------------------------------------------------------------------------------------ conformance


class TestS3Conformance(StorageTests):
    """The same suite local disk and memory:// pass, on the moto S3 server."""

    @pytest.fixture
    def storage(self, server: MotoS3Server, url: str, options: Callable[..., dict[str, Any]]) -> Iterator[Storage]:
        s = FsspecStorage(url, **options())
        yield s
        s.close()


def test_conditional_put_is_what_commits(server: MotoS3Server, url: str, options: Callable[..., Any]) -> None:
    """The manifest commit is one conditional request (If-None-Match: *), not a check followed by a write."""
    s = FsspecStorage(url, **options())
    assert s.atomic_create
    server.faults.clear()
    s.create("m.json", b"1")
    puts = server.faults.log("PUT", r"/m\.json$")
    assert len(puts) == 1 and not server.faults.log("HEAD")
    with pytest.raises(ConcurrentCommitError):
        s.create("m.json", b"2")
    assert s.read("m.json") == b"1"


def test_many_racing_creates_one_winner(server: MotoS3Server, url: str, options: Callable[..., Any]) -> None:
    stores = [FsspecStorage(url, **options()) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    results: list[str] = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            stores[i].create("runs/r/ckpt/x.json", f"writer {i}".encode())
            results.append(f"won {i}")
        except ConcurrentCommitError:
            results.append("lost")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == len(stores) - 1
    assert stores[0].read("runs/r/ckpt/x.json") == f"writer {winners[0].split()[1]}".encode()


# ------------------------------------------------------------------------------------------ end to end


def test_store_end_to_end(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options())
    states = [state(rng, big=2 * MiB)]  # 8 MiB of float32: the first pack is a multipart upload
    for _ in range(3):
        states.append(nudge(states[-1], rng))
    for i, s in enumerate(states):
        store.save("run", (i + 1) * 100, s, {"epoch": i + 1, "metrics": {"val_loss": 1.0 / (i + 1)}})
    assert server.faults.log("POST", r"/packs/.*"), "expected a multipart upload"
    assert store.runs() == ["run"] and store.steps("run") == [100, 200, 300, 400]
    reader = open_store(url, storage_options=options(cache_size=0))
    for i, s in enumerate(states):
        assert_same_state(reader.load(f"run@{(i + 1) * 100}"), s)
    assert_same_state(reader.load("run@best:val_loss"), states[-1])
    got = reader.load_tensor("run@epoch=2", "model/w")
    assert got.tobytes() == states[1]["model"]["w"].tobytes()
    res = store.delete(["run@200"])
    assert res["deleted"] == ["run@200"]
    assert store.gc()["removed_packs"] == 0  # delete already collected
    v = store.verify()
    assert v["ok"] and v["checkpoints"] == 3, v
    reader = open_store(url, storage_options=options(cache_size=0))
    for i in (0, 2, 3):
        assert_same_state(reader.load(f"run@{(i + 1) * 100}"), states[i])
    with pytest.raises(CheckpointNotFoundError):
        reader.load("run@200")
    assert not any(k.endswith(LOCK_FILE) for k in store.storage.list(""))  # every lease released
    store.close()


def test_cli_on_s3(server: MotoS3Server, url: str, tmp_path: Path, rng: np.random.Generator) -> None:
    opts = cli_options(server, tmp_path)
    rc, out = ckpt("init", "--store", url, *opts)
    assert rc == 0, out
    store = open_store(url, storage_options=server.storage_options(cache_size=0))
    s = state(rng)
    for step in (1, 2, 3):
        store.save("r", step, s, {"epoch": step})
        s = nudge(s, rng)
    rc, out = ckpt("ls", "--store", url, *opts, "--json")
    assert rc == 0, out
    assert [row["ref"] for row in json.loads(out)] == ["r@1", "r@2", "r@3"]
    rc, out = ckpt("rm", "r@2", "--store", url, *opts, "--json")
    assert rc == 0 and json.loads(out)["deleted"] == ["r@2"], out
    rc, out = ckpt("gc", "--store", url, *opts, "--json")
    assert rc == 0, out
    rc, out = ckpt("verify", "--store", url, *opts, "--json")
    assert rc == 0 and json.loads(out)["ok"], out
    rc, out = ckpt("export", "r@3", "--store", url, *opts, "--format", "safetensors", "-O", str(tmp_path / "x.st"))
    assert rc == 0 and (tmp_path / "x.st").is_file(), out
    rc, out = ckpt("select", "r", "1", "--store", url, *opts, "--json")
    assert rc == 0, out
    rc, out = ckpt("thin", "r", "--keep", "last:1", "--store", url, *opts, "--json")
    assert rc == 0, out
    rc, out = ckpt("ls", "--store", url, *opts, "--json")
    assert [row["ref"] for row in json.loads(out)] == ["r@3"], out
    # read-only access refuses writes before touching the store
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, out = ckpt("rm", "r@3", "--store", url, *opts, "-o", "read_only=true")
    assert rc == 2 and "read-only" in err.getvalue()
    # a wrong endpoint is a clear one-line error, after retries, not "no store here"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, _ = ckpt("ls", "--store", url, "-o", "endpoint_url=http://127.0.0.1:9", "-o", "retries=2",
                     "-o", "backoff=0.001", "-o", "key=x", "-o", "secret=x")  # fmt: skip
    assert rc == 2
    line = err.getvalue().strip()
    assert "failed after 2 attempts" in line and "\n" not in line, line


def test_watch_into_s3(server: MotoS3Server, url: str, tmp_path: Path) -> None:
    """``ckpt watch`` stores open_clip_train-style epoch files straight into an s3:// store."""
    torch = pytest.importorskip("torch")
    ckpts = tmp_path / "logs" / "job" / "checkpoints"
    ckpts.mkdir(parents=True)
    w = torch.zeros(64, 64)
    for epoch in (1, 2):
        w = w + 1
        torch.save({"epoch": epoch, "name": "job", "state_dict": {"w": w}, "optimizer": {"state": {},
                    "param_groups": []}}, ckpts / f"epoch_{epoch}.pt")  # fmt: skip
    rc, out = ckpt("watch", str(ckpts.parent), "--store", url, *cli_options(server, tmp_path), "--init",
                   "--idle-timeout", "0", "--poll", "0.05", "--settle", "0")  # fmt: skip
    assert rc == 0, out
    store = open_store(url, storage_options=server.storage_options(cache_size=0))
    assert store.steps("job") == [1, 2]
    assert torch.equal(store.load("job@2", tensors="torch")["state_dict"]["w"], w)


def test_endpoint_from_environment(
    server: MotoS3Server, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials and endpoint the usual way: AWS_* environment variables, no storage options at all."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("CKPTSTORE_REMOTE_CACHE", str(tmp_path / "cache"))
    s = open_storage(url)
    s.write("hello", b"world")
    assert s.read("hello") == b"world"


# ------------------------------------------------------------------------------------------ ranged reads


def test_load_tensor_transfers_only_that_tensors_bytes(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator
) -> None:
    store = create_store(url, storage_options=options())
    s1 = {f"layer{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}
    s2 = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3) for k, v in s1.items()}
    store.save("r", 1, s1)
    store.save("r", 2, s2)
    pack_bytes = sum(store.storage.size(k) for k in store.storage.list("packs"))

    for ref in ("r@1", "r@2"):
        reader = open_store(url, storage_options=options(cache_size=0))
        m = reader.resolve(ref)
        chain = m.chain(m.tensors["layer3"]["object"])
        want = sum(int(m.objects[o]["length"]) for o in chain)
        server.faults.clear()
        got = reader.load_tensor(ref, "layer3")
        assert got.tobytes() == (s1 if ref == "r@1" else s2)["layer3"].tobytes()
        gets = server.faults.log("GET", r"/packs/")
        moved = sum(r.bytes_out for r in gets)
        assert all(r.range for r in gets), "every pack read is a ranged GET"
        assert moved == want, (moved, want)
        assert moved < pack_bytes / 4
        print(f"\n{ref}: load_tensor moved {moved} bytes of packs ({len(gets)} ranged GETs) for a tensor stored "
              f"in {want} bytes (raw {got.nbytes}); the store's packs hold {pack_bytes} bytes")  # fmt: skip


def test_full_load_fetches_packs_in_few_large_requests(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options())
    s = {f"t{i:02d}": rng.standard_normal(5000).astype(np.float32) for i in range(60)}
    store.save("r", 1, s)
    reader = open_store(url, storage_options=options(cache_size=0))
    m = reader.resolve("r@1")
    server.faults.clear()
    assert_same_state(reader.load("r@1"), s)
    gets = server.faults.log("GET", r"/packs/")
    assert sum(r.bytes_out for r in gets) == sum(int(rec["length"]) for rec in m.objects.values())
    assert len(gets) == 1 < len(m.objects), "60 adjacent objects, one ranged GET"


def test_read_cache_serves_repeated_loads(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, tmp_path: Path
) -> None:
    store = create_store(url, storage_options=options())
    s = state(rng)
    store.save("r", 1, s)
    first = open_store(url, storage_options=options())
    first.load("r@1")
    server.faults.clear()
    second = open_store(url, storage_options=options())  # a new process would see the same cache dir
    assert second.load("r@1")["model"]["w"].tobytes() == s["model"]["w"].tobytes()
    assert not server.faults.log("GET", r"/packs/"), "pack ranges come from the local cache"
    assert server.faults.log("GET", r"/runs/"), "manifests are always read from the store"
    cache = second.storage.cache  # type: ignore[attr-defined]
    assert cache is not None and cache.hits >= 2 and 0 < cache.nbytes <= cache.max_bytes


# ------------------------------------------------------------------------------------------ concurrent commits


def test_two_writers_same_checkpoint_one_wins(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    """Two writers save run@7 at the same moment. They do not serialise on the lock (lock=none: writers that
    each believe they may write, as after a lease broken while its holder was paused); the conditional
    manifest commit decides: exactly one wins, the other gets ConcurrentCommitError, the checkpoint is intact."""
    create_store(url, storage_options=options())
    a = open_store(url, storage_options=options(lock="none"))
    b = open_store(url, storage_options=options(lock="none"))
    states = {"a": state(rng), "b": state(rng)}
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def racing(store: Store) -> None:
        inner = store.storage.create

        def create(key: str, data: bytes) -> None:
            barrier.wait(timeout=30)  # both packs are uploaded; both commit now
            inner(key, data)

        store.storage.create = create  # type: ignore[method-assign]

    def go(name: str, store: Store) -> None:
        try:
            store.save("run", 7, states[name], {"writer": name})
            outcome[name] = "won"
        except ConcurrentCommitError:
            outcome[name] = "lost"

    racing(a)
    racing(b)
    threads = [threading.Thread(target=go, args=(n, st)) for n, st in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["lost", "won"], outcome
    winner = next(n for n, o in outcome.items() if o == "won")
    reader = open_store(url, storage_options=options(cache_size=0))
    m = reader.resolve("run@7")
    assert m.metadata["writer"] == winner
    assert_same_state(reader.load("run@7"), states[winner])
    assert reader.verify()["ok"]
    packs = reader.storage.list("packs")
    assert packs == sorted(m.data["packs"]), "the loser removed its unreferenced pack"


def test_lease_lock_refuses_a_second_writer(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator
) -> None:
    create_store(url, storage_options=options())
    a = open_store(url, storage_options=options())
    b = open_store(url, storage_options=options())
    with a.storage.lock(LOCK_FILE):
        with pytest.raises(StoreLockedError) as ei:
            b.save("run", 1, state(rng))
        assert "a store-wide operation" in str(ei.value) and "holds the store-wide lock" in str(ei.value)
    b.save("run", 1, state(rng))
    assert b.steps("run") == [1]
    assert not b.storage.exists(LOCK_FILE)


def test_lease_lock_stale_is_broken_and_held_is_renewed(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator
) -> None:
    create_store(url, storage_options=options())
    st = open_store(url, storage_options=options(lock_ttl=0.3))
    dead = {"owner": "dead", "host": "gone", "pid": 1, "acquired": 0, "expires": time.time() - 1.0}
    st.storage.write(LOCK_FILE, json.dumps(dead).encode())
    st.save("run", 1, state(rng))  # breaks the stale lock (expired more than one ttl ago)
    assert not st.storage.exists(LOCK_FILE)
    with st.storage.lock(LOCK_FILE):
        first = json.loads(st.storage.read(LOCK_FILE))
        time.sleep(0.5)
        later = json.loads(st.storage.read(LOCK_FILE))
        assert later["owner"] == first["owner"] and later["expires"] > first["expires"]


# ------------------------------------------------------------------------------------------ faults


def _pack_parts_state(rng: np.random.Generator) -> dict[str, Any]:
    return state(rng, big=4 * MiB)  # a 16 MiB pack: parts 1-3 of 5 MiB and a last one


def test_500_mid_upload_is_retried(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options())
    s = _pack_parts_state(rng)
    server.faults.add("error", method="PUT", query="partNumber=2", times=2)
    server.faults.add("error", method="PUT", path=r"/runs/.*\.json$", status=503)
    store.save("r", 1, s)
    assert all(f.hits == f.times for f in server.faults.faults)
    assert store.storage.stats["retries"] >= 3  # type: ignore[attr-defined]
    assert_same_state(open_store(url, storage_options=options(cache_size=0)).load("r@1"), s)


def test_dropped_connections_mid_upload_are_retried(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options())
    s = _pack_parts_state(rng)
    # aiohttp re-sends an idempotent request once by itself when a kept-alive connection drops; two drops in a
    # row reach our retry layer.
    server.faults.add("drop", method="PUT", query="partNumber=3", times=3)
    store.save("r", 1, s)
    assert server.faults.faults[0].hits == 3
    assert_same_state(open_store(url, storage_options=options(cache_size=0)).load("r@1"), s)


def test_commit_whose_answer_was_lost_is_not_a_conflict(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    """The manifest PUT reaches the server, then the connection drops before the answer: the retry finds the
    key taken (412), and by its content knows it was its own commit."""
    store = create_store(url, storage_options=options())
    s = state(rng)
    f = server.faults.add("drop_after", method="PUT", path=r"/runs/.*\.json$", header="If-None-Match", times=2)
    store.save("r", 1, s)
    assert f.hits == 2
    assert_same_state(open_store(url, storage_options=options(cache_size=0)).load("r@1"), s)


def test_persistent_failure_at_commit_leaves_nothing_committed(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options(retries=3))
    s1 = state(rng)
    store.save("r", 1, s1)
    packs_before = store.storage.list("packs")
    server.faults.add("error", method="PUT", path=r"/runs/.*\.json$", times=0)
    with pytest.raises(RemoteStorageError) as ei:
        store.save("r", 2, nudge(s1, rng))
    assert "failed after 3 attempts" in str(ei.value)
    server.faults.clear()
    reader = open_store(url, storage_options=options(cache_size=0))
    assert reader.steps("r") == [1]  # no manifest: no checkpoint
    assert_same_state(reader.load("r@1"), s1)
    assert len(reader.storage.list("packs")) == len(packs_before) + 1  # the uploaded pack is garbage ...
    assert reader.gc()["removed_packs"] == 1  # ... that gc removes
    assert reader.storage.list("packs") == packs_before
    reader.save("r", 2, nudge(s1, rng))  # and the next save works
    assert reader.verify()["ok"]


def test_persistent_failure_mid_upload_aborts_the_upload(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator
) -> None:
    import boto3

    store = create_store(url, storage_options=options(retries=2))
    server.faults.add("error", method="PUT", query="partNumber=2", times=0)
    with pytest.raises(RemoteStorageError) as ei:
        store.save("r", 1, _pack_parts_state(rng))
    assert "uploading part 2" in str(ei.value)
    server.faults.clear()
    assert store.steps("r") == []
    assert store.storage.list("packs") == []  # the multipart upload never completed: no object at all
    client = boto3.client("s3", endpoint_url=server.endpoint)
    prefix = url.split("/", 3)[3]
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    assert uploads == [], "the failed upload was aborted"


def test_faults_while_reading_are_retried_or_clear(
    server: MotoS3Server, url: str, options: Callable[..., Any], rng: np.random.Generator, assert_same_state: Any
) -> None:
    store = create_store(url, storage_options=options())
    s = state(rng)
    store.save("r", 1, s)
    reader = open_store(url, storage_options=options(cache_size=0, retries=4))
    server.faults.add("truncate", method="GET", path=r"/packs/", times=2)
    server.faults.add("error", method="GET", path=r"/runs/", status=503, times=1)
    assert_same_state(reader.load("r@1"), s)
    assert all(f.hits == f.times for f in server.faults.faults)
    server.faults.clear()
    broken = open_store(url, storage_options=options(cache_size=0, retries=2))
    server.faults.add("error", method="GET", times=0, status=500)
    with pytest.raises(RemoteStorageError) as ei:  # an outage is not "no such checkpoint" ...
        broken.load("r@1")
    assert "failed after 2 attempts" in str(ei.value)
    with pytest.raises(RemoteStorageError):  # ... nor "no store here"
        open_store(url, storage_options=options(cache_size=0, retries=2))


# ------------------------------------------------------------------------------------------ release from S3


def test_release_from_s3(server: MotoS3Server, url: str, tmp_path: Path) -> None:
    """``ckpt release`` reads an s3:// store: the released folder loads in OpenCLIP, bit-identical."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("safetensors")
    pytest.importorskip("matplotlib")
    from ckptstore.torch import same_bits

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1,
           "head_width": 32}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
           "layers": 1}}  # fmt: skip
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    ckpt_state = {"epoch": 3, "name": "micro", "state_dict": model.state_dict()}
    store = create_store(url, storage_options=server.storage_options(**FAST, cache_size=0))
    store.save("micro", 300, ckpt_state, {"epoch": 3, "model": "micro-not-registered", "metrics": {"loss": 1.5}})
    (tmp_path / "micro.json").write_text(json.dumps(cfg))
    out = tmp_path / "rel"
    rc, text = ckpt("release", "micro", "--store", url, *cli_options(server, tmp_path), "--select", "1",
                    "--out", str(out), "--model-config", str(tmp_path / "micro.json"), "--json")  # fmt: skip
    assert rc == 0, text
    assert json.loads(text)["source_store"] == url
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'epoch-03-step-300'}")
    got = loaded.state_dict()
    assert list(got) == list(ckpt_state["state_dict"])
    for k, v in ckpt_state["state_dict"].items():
        assert same_bits(got[k], v), k
