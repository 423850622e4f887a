"""Writing a file so that a reader, a crash or a second writer never sees half of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace path's contents with text: a reader (or a crash) sees the old file or the new one,
    never half of one, even with several processes writing it at once (each through its own
    temporary file, fsynced before the rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
