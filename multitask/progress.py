"""Progress bars for long work (tqdm), written to stderr.

tqdm gives a smoothed rate and ETA (our hand-written bar averaged from the start, so the early ETA
of a 14-minute run read 1:25:50). On a terminal the bar redraws one line; elsewhere (CI logs,
nohup, a pipe) it prints one plain line every `log_every` seconds, so that logs stay readable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

# No monitor thread: the recorder forks helper processes, and a forked child must not inherit a
# thread that may hold tqdm's lock.
tqdm.monitor_interval = 0


class _Lines:
    """A file for tqdm off a terminal: each redraw becomes one line instead of a carriage return."""

    def __init__(self, out: TextIO):
        self.out = out

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.out.write(text + "\n")

    def flush(self) -> None:
        self.out.flush()


class Progress:
    """A bar over `total` units starting at `initial`; `update(n, postfix)` as work is done."""

    def __init__(self, total: int, desc: str, unit: str = "steps", initial: int = 0,
                 log_every: float = 30.0, enabled: bool = True):
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", initial=initial, disable=not enabled,
                         file=sys.stderr if tty else _Lines(sys.stderr), dynamic_ncols=tty,
                         mininterval=0.2 if tty else log_every,
                         smoothing=0.05, unit_scale=False)

    @property
    def n(self) -> int:
        return self._bar.n

    @n.setter
    def n(self, value: int) -> None:
        self._bar.n = value

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if postfix is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()  # draws the final state (including an `n` set directly)
