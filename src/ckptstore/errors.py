"""The one error hierarchy of ckptstore.

Every error raised on purpose derives from :class:`CkptStoreError`; specific errors also derive from the matching
built-in (``FileNotFoundError``, ``ValueError`` ...) so callers that catch the built-in keep working. Errors carry
structured fields (``path``, ``ref``, ``tensor``) and a ``hint`` saying what to do, which the CLI prints as one line.
"""

from __future__ import annotations


class CkptStoreError(Exception):
    """Base of every ckptstore error."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        ref: str | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.ref = ref
        self.tensor = tensor
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(self.message)
        if self.tensor:
            parts.append(f" (tensor {self.tensor!r})")
        if self.ref:
            parts.append(f" (checkpoint {self.ref})")
        if self.hint:
            parts.append(f" — {self.hint}")
        return "".join(parts)


class StoreNotFoundError(CkptStoreError, FileNotFoundError):
    """The path or URL holds no ckptstore store."""


class StoreExistsError(CkptStoreError, FileExistsError):
    """``init`` was asked to create a store where one (or other data) already exists."""


class CheckpointNotFoundError(CkptStoreError, KeyError):
    """A reference names no committed checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return CkptStoreError.__str__(self)


class CheckpointExistsError(CkptStoreError, FileExistsError):
    """A checkpoint with that run and step is already committed."""


class TensorNotFoundError(CkptStoreError, KeyError):
    """The checkpoint holds no tensor of that name."""

    def __str__(self) -> str:
        return CkptStoreError.__str__(self)


class InvalidReferenceError(CkptStoreError, ValueError):
    """A checkpoint reference (``run@step``, ``run@latest`` ...) does not parse."""


class InvalidNameError(CkptStoreError, ValueError):
    """A run or tensor name is unsafe or malformed (path separators, ``..``, control characters)."""


class InvalidStateError(CkptStoreError, TypeError):
    """A state handed to ``save`` holds a value the format cannot store (e.g. an arbitrary object)."""


class InvalidMetadataError(InvalidStateError, ValueError):
    """Checkpoint metadata breaks the schema (docs/metadata.md); ``field`` is the dotted path of the culprit."""

    def __init__(self, message: str, *, field: str | None = None, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.field = field


class InvalidQueryError(CkptStoreError, ValueError):
    """A ``--where``/``--sort``/``--columns`` expression does not parse; ``position`` is the 0-based offset."""

    def __init__(self, message: str, *, expression: str = "", position: int = 0, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.expression = expression
        self.position = position

    def __str__(self) -> str:
        text, pos = self.expression, self.position
        start = max(0, min(pos - 60, len(text) - 120))  # a window of 120 characters around the caret
        shown = text[start : start + 120]
        lead = "..." if start else ""
        tail = "..." if start + 120 < len(text) else ""
        shown = "".join(" " if c < " " else c for c in shown)  # keep the caret under its column
        return f"{CkptStoreError.__str__(self)}\n  {lead}{shown}{tail}\n  {' ' * (len(lead) + pos - start)}^"


class FormatError(CkptStoreError, ValueError):
    """Stored data does not follow the format: a damaged, truncated or foreign file."""


class UnsupportedVersionError(FormatError):
    """Stored data was written by a newer format version than this reader knows."""


class CodecError(CkptStoreError, ValueError):
    """A codec is unknown or its payload does not decode."""


class IntegrityError(CkptStoreError, ValueError):
    """Decoded bytes do not match their content hash: the store is damaged."""


class DamagedManifestError(IntegrityError, FormatError):
    """A manifest's bytes are damaged (bad checksum, not JSON): its checkpoint cannot be read."""


class ForeignCheckpointError(CkptStoreError, ValueError):
    """A foreign checkpoint file (``.pt``) cannot be read safely or is not what it claims to be."""


class StoreLockedError(CkptStoreError, BlockingIOError):
    """Another writer holds the store's write lock."""


class ConcurrentCommitError(CkptStoreError, FileExistsError):
    """Another writer committed the same checkpoint first."""


class MissingDependencyError(CkptStoreError, ImportError):
    """An optional dependency needed for this operation is not installed."""


class RemoteStorageError(CkptStoreError):
    """A remote store (S3, GCS ...) failed: unreachable after retries, refused the credentials, or no bucket.

    Deliberately not an ``OSError``: store code reads a missing key (``FileNotFoundError``/``OSError``) as "no such
    checkpoint", and an outage or a credentials problem must not be mistaken for that.
    """


class OutputPathError(CkptStoreError, OSError):
    """An output file or folder that cannot be written (a folder where a file is wanted, a missing parent, no
    permission); raised before any work is done."""


class StorageWriteError(CkptStoreError, OSError):
    """Writing a key failed (disk full, I/O error, a short write): the operation stopped, nothing half-written
    is visible, and what was committed before is intact. ``errno`` is the system's error number where known."""

    def __init__(self, message: str, *, errno: int | None = None, **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.errno = errno
