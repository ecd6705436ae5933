"""Retries with exponential backoff for remote storage calls, and which errors are worth retrying.

Object stores fail transiently all the time (a 500 or 503, a dropped connection, a read that stops halfway); a
retry a moment later usually succeeds. Everything else (a missing key, a refused credential, a failed condition)
is final and must surface at once. Each storage primitive is retried as a whole: a GET, a PUT, one part of a
multipart upload. Callers make the retried operation idempotent (see ``FsspecStorage.create``).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ckptstore.errors import RemoteStorageError

log = logging.getLogger("ckptstore.storage")
T = TypeVar("T")

#: errno values that s3fs and friends give HTTP 5xx answers and network failures.
_TRANSIENT_ERRNOS = {
    errno.EIO,  # an S3 error code s3fs does not know
    errno.EBUSY,  # 503 SlowDown, 409 OperationAborted
    getattr(errno, "EREMOTEIO", 121),  # 500 InternalError
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.EAGAIN,
}
#: Exception class names (anywhere in the MRO) of HTTP client libraries that mean "try again": botocore's
#: connection errors, aiohttp's payload and connection errors, fsspec's timeout. Matched by name so that no
#: optional library has to be imported here.
_TRANSIENT_NAMES = {
    "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError ...
    "ConnectionError",  # botocore's own (not the builtin): EndpointConnectionError, ConnectTimeoutError ...
    "IncompleteReadError",
    "ResponseStreamingError",
    "ClientPayloadError",  # aiohttp: the body stopped halfway
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ProtocolError",  # urllib3
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted"}  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: 5xx answers, throttling, timeouts, dropped connections."""
    if isinstance(exc, FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError | EOFError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _TRANSIENT_NAMES:
        return True
    response = getattr(exc, "response", None)  # a botocore ClientError that escaped translation
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _TRANSIENT_CODES or int(status or 0) >= 500
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__
    return cause is not None and cause is not exc and _is_transient_cause(cause)


def _is_transient_cause(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & _TRANSIENT_NAMES) or isinstance(exc, ConnectionError | TimeoutError)


def is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, PermissionError) or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")


@dataclass
class RetryPolicy:
    """``attempts`` tries in all, sleeping a random time up to ``backoff * 2**(try - 1)`` (capped at
    ``max_backoff`` seconds) between them ("full jitter", so that many clients do not retry in step)."""

    attempts: int = 6
    backoff: float = 0.2
    max_backoff: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        where: str,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> T:
        """Run ``fn``; retry transient failures; turn exhausted retries and credential errors into
        :class:`RemoteStorageError`. Other errors (missing key, failed condition ...) pass through unchanged."""
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:
                if is_auth_error(exc):
                    raise RemoteStorageError(
                        f"{what} refused: {exc}",
                        path=where,
                        hint="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                        "--storage-option key=... secret=...) and the bucket policy",
                    ) from exc
                if not is_transient(exc):
                    raise
                if attempt >= self.attempts:
                    raise RemoteStorageError(
                        f"{what} failed after {attempt} attempts: {type(exc).__name__}: {exc}",
                        path=where,
                        hint="the storage service or the network is failing; writes are all-or-nothing (no "
                        "half-written checkpoint is ever committed), so run the command again later",
                    ) from exc
                if on_retry is not None:
                    on_retry(attempt, exc)
                pause = self.delay(attempt)
                log.info("%s at %s: %s; retry %d/%d in %.2fs", what, where, exc, attempt, self.attempts - 1, pause)
                time.sleep(pause)
                attempt += 1
