"""The report in a real browser: headless Chromium loads the page, every plot decodes, the console stays clean.

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages separated
by NUL bytes on file descriptors 3 and 4), so the test needs nothing beyond the standard library and the browser:

1. navigate to the ``file://`` page and wait for ``Page.loadEventFired``;
2. collect ``Runtime.consoleAPICalled`` (type ``error``/``assert``), ``Runtime.exceptionThrown`` and
   ``Log.entryAdded`` (level ``error``: CSP violations, failed loads) events, and every request the page makes;
3. ask the page, for every ``<img>``, ``complete``, ``naturalWidth`` and whether ``img.decode()`` resolves (a
   corrupt PNG loads as "complete" with ``naturalWidth == 0`` and a rejected ``decode()``);
4. take a full-page screenshot (``Page.captureScreenshot`` beyond the viewport).

:func:`assert_rendered_ok` is the one check; two tests prove that it fails on a corrupt image and on a console
error. Without Chromium the tests fail (CI installs it, see .ci/run) unless ``CKPT_SKIP_BROWSER=1`` is set.
Set ``CKPT_REPORT_SCREENSHOT_DIR`` to keep the screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ckptstore.analysis import MemoryTrajectory
from ckptstore.analysis.report import build_report

# Launch flags measured on this project's machines: no sandbox (we run as root in a container), no GPU, and no
# background traffic, so the only requests are the page's own.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TIMEOUT = 60.0
WIDTH = 1280


def chromium_path() -> str | None:
    for name in (os.environ.get("CKPT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("CKPT_SKIP_BROWSER") == "1":
            pytest.skip("chromium is not installed and CKPT_SKIP_BROWSER=1 is set")
        pytest.fail(
            "chromium is not installed: `apt-get install -y chromium` (CI's .ci/run does), or set "
            "CKPT_SKIP_BROWSER=1 to skip the browser checks explicitly",
            pytrace=False,
        )
    return path


# ---------------------------------------------------------------------------------------------- the browser


@dataclass
class Rendered:
    """What the browser saw of one page."""

    url: str
    loaded: bool
    title: str
    images: list[dict[str, Any]]  # per <img>: id of its figure, complete, naturalWidth, naturalHeight, decoded
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class DevTools:
    """One headless Chromium, spoken to over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4. The pipe ends go to the child at fds >= 10 and
        # bash moves them to 3 and 4 (POSIX sh cannot name fds above 9); no preexec_fn needed.
        ours = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w)]
        for fd in (cmd_r, res_w):
            os.close(fd)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{ours[0]} 4>&{ours[1]}',
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=ours,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        for fd in ours:
            os.close(fd)
        self._out = cmd_w
        self._in = res_r
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.log_path = log

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer in time; its log: {self.log_tail()}")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe; its log: {self.log_tail()}")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        out: dict[str, Any] = json.loads(msg)
        return out

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                result: dict[str, Any] = m.get("result", {})
                return result
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()


_IMAGES_JS = """
Promise.all([...document.images].map(img => img.decode().then(() => true, () => false).then(decoded => {
  // Count the pixels that did not arrive: the report's plots are opaque, a truncated PNG leaves transparent holes.
  let missing = -1;
  if (decoded && img.naturalWidth > 0) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    missing = 0;
    for (let k = 3; k < px.length; k += 4) if (px[k] < 255) missing++;
  }
  return {id: (img.closest('figure') || img).id, complete: img.complete, naturalWidth: img.naturalWidth,
          naturalHeight: img.naturalHeight, decoded, missing};
})))
"""


def _console_text(event: dict[str, Any]) -> str | None:
    """The text of an error-level console message, exception or browser log entry; ``None`` for anything else."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        return (
            "console."
            + params["type"]
            + ": "
            + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        )
    if method == "Runtime.exceptionThrown":
        d = params.get("exceptionDetails", {})
        return "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        e = params["entry"]
        return f"{e.get('source')}: {e.get('text')} {e.get('url') or ''}".strip()
    return None


@contextlib.contextmanager
def devtools(binary: str) -> Iterator[DevTools]:
    with tempfile.TemporaryDirectory(prefix="ckpt-chromium-") as tmp:
        profile = Path(tmp, "profile")
        profile.mkdir()
        dt = DevTools(binary, profile, Path(tmp, "chromium.log"))
        try:
            yield dt
        finally:
            dt.close()


def render(binary: str, page: Path) -> Rendered:
    """Load ``page`` in a fresh headless Chromium and report what happened (see the module docstring)."""
    url = page.resolve().as_uri()
    with devtools(binary) as dt:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.send(f"{domain}.enable", session=sid)
        dt.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=sid,
        )
        dt.events.clear()
        dt.send("Page.navigate", {"url": url}, session=sid)
        dt.wait_event("Page.loadEventFired")
        state = dt.send("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True}, session=sid)[
            "result"
        ].get("value")
        images = dt.send(
            "Runtime.evaluate", {"expression": _IMAGES_JS, "awaitPromise": True, "returnByValue": True}, session=sid
        )["result"].get("value", [])
        title = dt.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session=sid)[
            "result"
        ].get("value", "")
        height = dt.send("Page.getLayoutMetrics", session=sid)["cssContentSize"]["height"]
        shot = dt.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
            },
            session=sid,
        )
        # Anything the page logged while we looked (a late error still counts).
        errors = [t for e in dt.events if (t := _console_text(e)) is not None]
        requests = [e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"]
    return Rendered(url, state == "complete", title, images, errors, requests, base64.b64decode(shot["data"]))


def assert_rendered_ok(r: Rendered, n_images: int) -> None:
    """The page loaded, fetched nothing but itself, showed all ``n_images`` plots decoded, and logged no error."""
    assert r.loaded, f"{r.url} did not finish loading"
    assert not r.console_errors, f"console errors: {r.console_errors}"
    assert [u for u in r.requests if not u.startswith("data:")] == [r.url], f"requests: {r.requests}"
    assert len(r.images) == n_images, f"{len(r.images)} images in the browser, {n_images} in the HTML"
    broken = [
        i for i in r.images if not (i["complete"] and i["naturalWidth"] > 0 and i["decoded"] and i["missing"] == 0)
    ]
    assert not broken, f"images that did not decode: {broken}"
    png = _decode_png(r.screenshot)
    assert png.shape[1] == WIDTH and png.shape[0] > 900
    assert png.std() > 10, "the screenshot is blank"


def _decode_png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def _keep_screenshot(r: Rendered, tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_bytes(r.screenshot)
    keep = os.environ.get("CKPT_REPORT_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


# ---------------------------------------------------------------------------------------------- pages


def _sample_page(t: int = 8) -> str:
    """A report with every section, from compact hand-made analysis records."""
    rng = np.random.default_rng(0)
    pts = [{"index": i, "label": f"run@{100 * i}", "step": 100 * i, "epoch": i} for i in range(t)]
    metas = [
        {
            "step": 100 * i,
            "epoch": i,
            "loss": {"last": 3 / (i + 1), "avg": 3.1 / (i + 1), "window": 10},
            "lr": [1e-3 * (1 - i / t)],
            "metrics": {"val_loss": 2.5 / (i + 1), "image_to_text_R@1": 0.05 * i},
        }
        for i in range(t)
    ]
    traj = MemoryTrajectory([{"w": np.zeros(2, np.float32)}] * t, metadata=metas, labels=[p["label"] for p in pts])

    def curve(a: float, b: float) -> list[float]:
        return (np.linspace(a, b, t) + rng.normal(0, 0.01, t)).tolist()  # type: ignore[no-any-return]

    mods = {
        f"visual.transformer.resblocks.{k}": {
            "norm": curve(10, 11),
            "dist_init": curve(0, 1 + k),
            "dist_prev": [None, *curve(0.3, 0.1)[1:]],
            "rel_update": [None, *curve(0.03, 0.01)[1:]],
            "cos_init": curve(1, 0.9),
            "cos_final": curve(0.9, 1),
            "numel": 1000,
        }
        for k in range(6)
    }
    cka = np.clip(1 - np.abs(np.subtract.outer(range(t), range(t))) / t, 0, 1).tolist()
    page = build_report(
        traj,
        weights={
            "points": pts,
            "modules": mods,
            "model": {
                "norm": curve(50, 51),
                "dist_init": curve(0, 5),
                "dist_prev": [None, *curve(1, 0.5)[1:]],
                "path_length": 6.0,
                "displacement": 5.0,
                "straightness": 0.83,
            },
            "pca": {
                "coords": rng.normal(size=(t, 2)).cumsum(0).tolist(),
                "explained_variance_ratio": [0.6, 0.2],
                "method": "pca",
                "sketch_dim": None,
            },
        },
        stability={
            "points": pts,
            "checked": ["loss_spike"],
            "flags": [
                {
                    "kind": "loss_spike",
                    "where": "model",
                    "index": 2,
                    "label": pts[2]["label"],
                    "what": "loss jumped",
                    "confidence": "medium",
                    "score": 2.0,
                    "value": 4.0,
                    "threshold": 3.0,
                }
            ],
        },
        representations={
            "points": pts,
            "probe": {"name": "digits", "n_images": 100, "n_texts": 10, "classes": 10},
            "cka": {"image": cka, "text": cka, "blocks": {f"b{k}": cka for k in range(3)}},
            "zero_shot": {"top1": curve(0.1, 0.5), "top5": curve(0.4, 0.9)},
            "retrieval": {"image_to_text": {"R@1": curve(0.1, 0.3)}, "text_to_image": {"R@1": curve(0.1, 0.35)}},
            "effective_dim": {"image": curve(10, 20), "text": curve(8, 15)},
        },
        transfer={
            "points": pts,
            "dataset": {"name": "digits", "n_train": 100, "n_test": 50, "classes": 10},
            "accuracy": curve(0.3, 0.8),
            "train_accuracy": curve(0.4, 0.9),
            "best": None,
        },
    )
    return page


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    page = _sample_page()
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(page, encoding="utf-8")
    return path, page


def _n_images(page: str) -> int:
    return len(re.findall(r"<img\s", page))


# ---------------------------------------------------------------------------------------------- tests


def test_report_renders_in_chromium(chromium: str, sample: tuple[Path, str], tmp_path: Path) -> None:
    path, page = sample
    r = render(chromium, path)
    assert _n_images(page) >= 8
    assert_rendered_ok(r, _n_images(page))
    assert r.title.startswith("Training report")
    assert _decode_png(r.screenshot).shape[0] > 3000  # the whole page, not one viewport
    _keep_screenshot(r, tmp_path, "sample-report.png")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_fails_the_check(chromium: str, sample: tuple[Path, str], tmp_path: Path, damage: str) -> None:
    _, page = sample
    # The second plot's base64 stays valid base64, but its PNG is broken: "garbage" loses the PNG signature (the
    # browser gives up: naturalWidth 0), "truncated" keeps the header and dimensions and zeroes the image data (the
    # browser reports a decoded image of the right size whose pixels never arrived).
    payloads = re.findall(r'<figure id="([^"]+)"><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    fig_id, payload = payloads[1]
    raw = base64.b64decode(payload)
    raw = (
        bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8))
        if damage == "garbage"
        else (raw[:64] + b"\x00" * 64)
    )
    bad = tmp_path / f"{damage}.html"
    bad.write_text(page.replace(payload, base64.b64encode(raw).decode()), encoding="utf-8")
    r = render(chromium, bad)
    with pytest.raises(AssertionError, match=f"images that did not decode: .*'{fig_id}'"):
        assert_rendered_ok(r, _n_images(page))
    (hurt,) = [i for i in r.images if i["id"] == fig_id]
    if damage == "garbage":
        assert hurt["naturalWidth"] == 0
    else:
        assert hurt["naturalWidth"] > 0 and hurt["missing"] > 0


def test_a_console_error_fails_the_check(chromium: str, sample: tuple[Path, str], tmp_path: Path) -> None:
    _, page = sample
    # Without the page's Content-Security-Policy, an inline script that logs an error.
    no_csp = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    bad = tmp_path / "console.html"
    bad.write_text(no_csp.replace("</body>", '<script>console.error("boom")</script></body>'), encoding="utf-8")
    with pytest.raises(AssertionError, match=r"console errors: .*boom"):
        assert_rendered_ok(render(chromium, bad), _n_images(page))
    # With it, the same script is refused, and the refusal is itself an error the check sees.
    blocked = tmp_path / "blocked.html"
    blocked.write_text(page.replace("</body>", '<script>console.error("boom")</script></body>'), encoding="utf-8")
    r = render(chromium, blocked)
    assert not any("boom" in e for e in r.console_errors)
    with pytest.raises(AssertionError, match="Content Security Policy"):
        assert_rendered_ok(r, _n_images(page))


def test_a_fetch_fails_the_check(chromium: str, sample: tuple[Path, str], tmp_path: Path) -> None:
    _, page = sample
    bad = tmp_path / "fetch.html"
    bad.write_text(page.replace("</body>", '<img src="http://127.0.0.1:9/x.png" alt="x"></body>'), encoding="utf-8")
    with pytest.raises(AssertionError):
        assert_rendered_ok(render(chromium, bad), _n_images(page) + 1)


@pytest.mark.slow
def test_demo_report_renders_in_chromium(chromium: str, demo_report: tuple[Path, str], tmp_path: Path) -> None:
    """The acceptance check of issue 5: ``ckpt report`` on the demo run (the ``demo_report`` fixture, made once
    for this test and test_report.py's), rendered and screenshotted."""
    out, _stdout = demo_report
    page = out.read_text(encoding="utf-8")
    r = render(chromium, out)
    assert_rendered_ok(r, _n_images(page))
    assert _n_images(page) >= 6
    _keep_screenshot(r, tmp_path, "demo-report.png")
