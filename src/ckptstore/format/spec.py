"""Format constants and limits. Changing any of these is a format change: bump FORMAT_VERSION."""

from __future__ import annotations

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 1

STORE_FILE = "ckptstore.json"
RUNS_DIR = "runs"
PACKS_DIR = "packs"
LOCK_FILE = ".lock"

MANIFEST_KIND = "ckptstore.manifest"
PACK_MAGIC = b"CKPTPACK"  # 8 bytes, then a little-endian u32 version; objects follow back to back
PACK_HEADER_SIZE = 16  # magic (8) + version (4) + reserved (4)

MAX_NAME_LENGTH = 255  # one run name or one tensor-name component, in UTF-8 bytes
MAX_TENSOR_NAME_LENGTH = 4096
MAX_NDIM = 64
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_STEP = 2**63 - 1
