"""Files replaced whole: a reader sees the previous file or the new one, never half of one.

Training stages rewrite checkpoints and exports that a resumed run, the server or another
stage may read at any moment, and a kill or a full disk can stop a writer at any byte. Every
writer of such a file goes through ``atomic_path``: it writes a hidden temporary file in the
destination's folder, which is flushed to disk and renamed over the destination (a rename
within one volume is atomic on POSIX and Windows); when writing fails the temporary file is
removed and the destination keeps its previous content. Standard library only: Blender
imports it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """A temporary path beside ``path`` for the block to write a file at; when the block
    succeeds the file is synced and renamed to ``path`` (mode 0644, as ``open`` would make
    it), when it fails the file is removed. The name is random (two writers never share
    one): a writer that records its file's name inside (``torch.save`` names its archive
    after a path) should write to ``open(tmp, "wb")`` for reproducible bytes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)                       # mkstemp makes it private
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())                   # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` through ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
