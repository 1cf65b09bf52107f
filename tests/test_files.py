"""portrait_rig.files: a file is replaced whole or not at all."""

import os
import stat

import pytest

from portrait_rig.files import atomic_path, write_atomic


def test_a_written_file_replaces_the_old_one_readable_by_all(tmp_path):
    path = tmp_path / "deep" / "model.safetensors"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644     # not mkstemp's private 0600
    assert os.listdir(path.parent) == ["model.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_atomic(path, b"complete")
    with pytest.raises(OSError, match="No space"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise OSError("No space left on device")
    assert path.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
