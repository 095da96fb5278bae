"""Progress bars that suit where stderr goes: a live tqdm bar on a terminal, and one plain line
every few seconds in a log file, so a redirected log holds readable lines, not carriage-return redraws."""

from __future__ import annotations

import sys
import time
from typing import Iterable

from tqdm.auto import tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
LINE_INTERVAL_S = 5.0


class LineProgress:
    """The part of tqdm's interface diffkit uses, printed as one line per `interval` seconds (and a
    last one at close), formatted by tqdm itself."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, initial: float = 0,
                 desc: str = "", unit: str = "it", unit_scale: bool = False, interval: float = LINE_INTERVAL_S,
                 file=None):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.unit_scale, self.interval, self.file = unit_scale, interval, file or sys.stderr
        self.initial, self.postfix = initial, ""
        self.started = self.last_print = time.monotonic()
        self.closed, self.printed_n = False, None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_print >= self.interval:
            self._print()

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.printed_n:
                self._print()

    def _print(self) -> None:
        now = time.monotonic()
        self.last_print, self.printed_n = now, self.n
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        total = max(self.total, self.n) if self.total else None  # a last batch may overshoot the total
        line = tqdm.format_meter(self.n, total, elapsed, prefix=self.desc, unit=self.unit, unit_scale=self.unit_scale,
                                 rate=rate, postfix=self.postfix, bar_format=LINE_FORMAT if total else None)
        print(line.replace("\r", ""), file=self.file, flush=True)


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, disable: bool = False):
    """tqdm on a terminal, LineProgress when stderr is redirected; `disable` silences both."""
    if disable:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale)
