"""Progress of the long commands (training stages, corpus sampling, evaluation), by tqdm.

On a terminal tqdm redraws one line (count, rate, ETA and the latest loss terms). When stderr
is a file or a pipe (cluster logs) the same text is printed as a plain line at most every
``log_interval`` seconds and at the end, with no carriage returns. A resumed run says so.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts ``done`` of ``total`` units, starting at ``start`` (resumed runs)."""

    def __init__(self, total: int, label: str, start: int = 0, enabled: bool = True,
                 stream=None, log_interval: float = 30.0, unit: str = "it"):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_interval = log_interval
        self.last = time.monotonic()
        # tqdm keeps the counts, rate and ETA either way; on a pipe it never draws itself.
        self.bar = tqdm(total=total, initial=start, desc=label, unit=unit, file=self.stream,
                        disable=not self.tty, dynamic_ncols=True, mininterval=0.1)
        self.start, self.label, self.unit = start, label, unit
        self.t0 = time.monotonic()
        self.info = ""
        if enabled and start:
            self.stream.write(f"{label}: resuming at {start} of {total}\n")
            self.stream.flush()

    @property
    def done(self) -> int:
        return self.bar.n

    def update(self, n: int = 1, **info) -> None:
        if info:
            self.info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in info.items())
            if self.tty:
                self.bar.set_postfix_str(self.info, refresh=False)
        if self.tty:
            self.bar.update(n)
            return
        self.bar.n += n                        # counted, not drawn
        now = time.monotonic()
        if self.enabled and now - self.last >= self.log_interval:
            self._line()
            self.last = now

    def close(self) -> None:
        if self.enabled and not self.tty:
            self._line()
        self.bar.close()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.bar.n - self.start) / elapsed if elapsed > 0 else None
        text = tqdm.format_meter(self.bar.n, self.bar.total, elapsed, ncols=0,
                                 prefix=self.label, unit=self.unit, rate=rate)
        self.stream.write(f"{text}  {self.info}".rstrip() + "\n")
        self.stream.flush()
