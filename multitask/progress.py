"""A small progress bar (rate, ETA, free-form postfix) for long work, written to stderr.

On a terminal it redraws one line; elsewhere (CI logs, nohup) it prints a line every
`log_every` seconds so that logs stay readable.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "steps", initial: int = 0,
                 log_every: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = initial
        self.postfix = ""
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.log_every = 0.2 if self.tty else log_every
        self._t0 = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def rate(self) -> float:
        return (self.n - self._start_n) / max(self.elapsed, 1e-9)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.log_every:
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        rate = self.rate
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.n / max(self.total, 1)
        eta_s = _fmt_time(eta) if eta != float("inf") else "?"
        line = (f"{self.desc}: {pct:5.1f}% {self.n}/{self.total} {self.unit} "
                f"[{_fmt_time(self.elapsed)}<{eta_s}, {rate:,.0f} {self.unit}/s] {self.postfix}")
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120) + end)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(end="\n" if self.tty else "")
