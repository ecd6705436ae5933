"""A real S3 protocol server on loopback for tests and benchmarks: moto's server mode.

Two ways to run it:

* ``MotoS3Server()`` serves moto in a thread of this process, behind :class:`FaultInjector`, a WSGI front end
  that sees every request before moto does. It can answer an error (500 by default), drop the connection
  before or after moto handled the request, or cut a response body halfway, for requests matching a method,
  a path pattern, a query string piece or a header; and it logs every request with its ``Range`` and the bytes
  that went in and out. It also makes moto's conditional writes atomic (see below).
* ``MotoS3Server(process=True)`` runs ``python -m moto.server`` as a child process: no faults or log, but the
  server does not share this process's GIL, which is what a throughput benchmark wants.

moto checks ``If-None-Match: *`` and then stores the object in two steps, and its server handles requests on
parallel threads, so two racing conditional puts can both pass the check. S3 itself decides them atomically.
The front end serialises requests that carry ``If-None-Match`` so that the server behaves like S3 in race tests.

Example::

    with MotoS3Server() as server:
        server.create_bucket("bucket")
        store = ckptstore.create_store("s3://bucket/store", storage_options=server.storage_options())
        server.faults.add("error", method="PUT", query="partNumber=2")   # the 2nd part fails once, then works
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptstore.errors import MissingDependencyError

#: Dummy credentials: moto accepts any, but botocore insists on some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

StartResponse = Callable[..., Any]

_ACTIONS = ("error", "drop", "drop_after", "truncate")


@dataclass
class Fault:
    """One rule. ``action``: ``error`` (answer ``status`` without passing the request on), ``drop`` (close the
    connection without an answer, request not passed on), ``drop_after`` (moto handles the request, then the
    connection closes before the answer: the client cannot know it succeeded), ``truncate`` (send the headers
    and half the body, then close). It hits ``times`` matching requests (0: all) after letting ``skip`` pass."""

    action: str
    method: str | None = None
    path: str | None = None  # regular expression searched in the path, "/bucket/key"
    query: str | None = None  # substring of the query string, e.g. "uploadId" or "partNumber=2"
    header: str | None = None  # a request header that must be present, e.g. "If-None-Match"
    status: int = 500
    times: int = 1
    skip: int = 0
    seen: int = 0
    hits: int = 0

    def matches(self, environ: dict[str, Any]) -> bool:
        if self.method and environ["REQUEST_METHOD"] != self.method:
            return False
        if self.path and not re.search(self.path, environ.get("PATH_INFO", "")):
            return False
        if self.query and self.query not in environ.get("QUERY_STRING", ""):
            return False
        return not (self.header and "HTTP_" + self.header.upper().replace("-", "_") not in environ)

    def fire(self) -> bool:
        """Count a matching request; True if this one gets the fault."""
        self.seen += 1
        if self.seen <= self.skip or (self.times and self.hits >= self.times):
            return False
        self.hits += 1
        return True


@dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    bytes_in: int
    status: int = 0
    bytes_out: int = 0
    fault: str | None = None

    @property
    def key(self) -> str:
        """The object key (path without the bucket)."""
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 else ""


@dataclass
class FaultInjector:
    """WSGI middleware in front of moto: faults, a request log and atomic conditional writes."""

    app: Callable[..., Any]
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conditional = threading.Lock()

    def add(self, action: str, **match: Any) -> Fault:
        if action not in _ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; one of {_ACTIONS}")
        f = Fault(action, **match)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def log(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Logged requests, optionally only those of one method whose path matches a regular expression."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or re.search(path, r.path))
            ]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        req = Request(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            environ.get("HTTP_RANGE"),
            int(environ.get("CONTENT_LENGTH") or 0),
        )
        fault = None
        with self._lock:
            self.requests.append(req)
            for f in self.faults:
                if f.matches(environ) and f.fire():
                    fault = f
                    break
        if fault is not None:
            req.fault = fault.action
            if fault.action == "error":
                _drain(environ, req.bytes_in)
                req.status = fault.status
                code = "SlowDown" if fault.status == 503 else "InternalError"
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected fault</Message></Error>"
                ).encode()
                start_response(f"{fault.status} Injected", [("Content-Type", "application/xml"),
                                                            ("Content-Length", str(len(body)))])  # fmt: skip
                return [body]
            if fault.action == "drop":
                _hang_up(environ)
        conditional = "HTTP_IF_NONE_MATCH" in environ and req.method in ("PUT", "POST")
        with self._conditional if conditional else contextlib.nullcontext():
            status_holder: list[str] = []

            def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                status_holder.append(status)
                req.status = int(status.split()[0])
                if fault is not None and fault.action == "drop_after":
                    return lambda data: None
                return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

            body_parts = list(self.app(environ, capture))
        if fault is not None and fault.action == "drop_after":
            _hang_up(environ)
        if fault is not None and fault.action == "truncate":
            data = b"".join(body_parts)
            return _truncated(environ, data, req)
        req.bytes_out = sum(len(p) for p in body_parts)
        return body_parts


def _drain(environ: dict[str, Any], n: int) -> None:
    stream = environ["wsgi.input"]
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            break
        n -= len(chunk)


def _hang_up(environ: dict[str, Any]) -> None:
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    # werkzeug treats a ConnectionError from the app as a dropped connection, quietly.
    raise ConnectionResetError("fault injected: connection dropped")


def _truncated(environ: dict[str, Any], data: bytes, req: Request) -> Iterator[bytes]:
    half = data[: len(data) // 2]
    req.bytes_out = len(half)
    yield half
    _hang_up(environ)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MotoS3Server:
    """moto's S3 on ``127.0.0.1:port`` (a free port by default); a context manager."""

    def __init__(self, *, process: bool = False, port: int | None = None) -> None:
        try:
            import moto  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError("the S3 test server needs moto", hint="pip install 'moto[server]'") from exc
        self.process = process
        # In a thread the server binds port 0 itself (no window in which another process can take a port picked
        # in advance, as two test workers starting servers at once could); a child process needs one up front.
        self.port = port or (free_port() if process else 0)
        self.faults: FaultInjector
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoS3Server:
        for k, v in CREDENTIALS.items():
            os.environ.setdefault(k, v)
        if self.process:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                MotoRequestHandler,
                create_backend_app,
            )
            from werkzeug.serving import make_server

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                "127.0.0.1", self.port, self.faults, threaded=True, request_handler=MotoRequestHandler
            )
            self.port = self._server.server_port
            self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
            self._thread.start()
        self._wait_ready()
        return self

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (in thread mode, the port is known once the server is started)."""
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with status {self._proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server on {self.endpoint} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (plus any of ckptstore's remote options)."""
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]},
            **extra,
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_buckets(*buckets: str, **server_options: Any) -> Iterator[MotoS3Server]:
    """A started :class:`MotoS3Server` with ``buckets`` created, and the dummy credentials in the environment
    while it runs (restored after): what every S3 test module starts from."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with MotoS3Server(**server_options) as server:
            for bucket in buckets:
                server.create_bucket(bucket)
            yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
