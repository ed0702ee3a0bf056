"""Files: the one atomic write and the one set of digests (numpy- and torch-free).

Atomic writes are the rule for every file the project writes for another process (or a resumed run) to read: a
reader sees the old file or the whole new one, never a part. ``checkpoint_hash`` identifies a checkpoint
directory (export records it in a bundle's manifest; the runtime, eval and bench check it without torch).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden: ``.NAME.PID.tmp``) for any writer to fill; when the block
    ends without error it is fsynced and renamed over ``path``. On error ``path`` is untouched and the temporary
    removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


CHECKPOINT_FILES = ("config.json", "model.safetensors", "normalization.json")  # what a checkpoint's hash covers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint's config, weights and statistics (each file's name, then its bytes): identifies the
    checkpoint an engine was built from. ``CheckpointError`` names a missing file."""
    from par_deploy.errors import CheckpointError

    h = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        p = Path(path) / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing checkpoint file (cannot tell which checkpoint this is)")
        h.update(name.encode())
        with open(p, "rb") as fh:  # in chunks: a paper-sized checkpoint is not read into memory at once
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
