"""What every training run folder shares: one run at a time per folder.

Two processes training into one folder would interleave their logs and overwrite each other's
checkpoints. ``lock_run_folder`` takes an exclusive ``flock`` on ``<folder>/.lock`` (released
by the kernel when the process dies, so a killed run never leaves a stale lock) and refuses a
second process with a message naming the holder. Within one process the lock is re-entrant
(a run resumed in the same process after an exception takes it again).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def check_device(device: str) -> None:
    """Refuse a device torch cannot use before any work starts (ValueError)."""
    from server.backends.base import torch_device

    torch_device(device)


def run_command(body) -> int:
    """Run a training command's ``body``; a problem the user can fix (bad file, busy folder,
    missing CUDA, Ctrl+C) becomes one ``error:`` line and exit status 1, not a traceback. The
    process group of a torchrun launch is left cleanly either way."""
    import sys

    from server.checkpoints.torch_file import CheckpointError
    from server.training import distributed

    finished = False
    try:
        body()
        finished = True
    except (ValueError, FileNotFoundError, RunFolderBusy, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        distributed.teardown(finished)
    return 0


class RunFolderBusy(RuntimeError):
    """Another process is training into the same run folder."""


class RunLock:
    """A held run folder; ``release`` (or leaving a ``with`` block) gives it back."""

    def __init__(self, fd: int, key: str):
        self.fd, self.key, self.holders = fd, key, 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            os.close(self.fd)           # closing drops the flock
            del _HELD[self.key]

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, RunLock] = {}


def lock_run_folder(folder) -> RunLock:
    """Hold ``folder`` (created if needed) for this process. Raises ``RunFolderBusy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key].holders += 1
        return _HELD[key]
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(f"{folder} is in use by another training run (pid {holder}); "
                            "wait for it to finish or train into another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = RunLock(fd, key)
    return _HELD[key]
