"""A dependency-free progress bar for the training stages (stderr).

On a terminal it redraws one line: ``label  1200/5000 [#####.....] 24%  3.1 it/s  ETA 20:25
loss 0.0123``. When stderr is a file or a pipe (cluster logs) it prints a plain line at most
every ``log_interval`` seconds, and at the end.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts ``done`` of ``total`` units, starting at ``start`` (resumed runs)."""

    def __init__(self, total: int, label: str, start: int = 0, enabled: bool = True,
                 stream=None, log_interval: float = 30.0, unit: str = "it"):
        self.total, self.label, self.done, self.start = total, label, start, start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_interval, self.unit = log_interval, unit
        self.t0 = self.last = time.monotonic()
        self.info = ""

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if info:
            self.info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in info.items())
        now = time.monotonic()
        if self.tty and now - self.last >= 0.1:
            self._draw("\r", "")
            self.last = now
        elif self.enabled and not self.tty and now - self.last >= self.log_interval:
            self._draw("", "\n")
            self.last = now

    def close(self) -> None:
        if self.enabled:
            self._draw("\r" if self.tty else "", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        fraction = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(20 * fraction) + "." * (20 - int(20 * fraction))
        line = (f"{self.label}  {self.done}/{self.total} [{bar}] {100 * fraction:3.0f}%  "
                f"{rate:.3g} {self.unit}/s  ETA {_clock(eta)}  {self.info}")
        self.stream.write(f"{prefix}{line.rstrip()}\033[K{suffix}" if self.tty
                          else f"{prefix}{line.rstrip()}{suffix}")
        self.stream.flush()
