"""Progress of the scoring and testing phase, reported on stderr (never stdout: it carries JSON).

The statistics code calls `report(phase, done, total, unit)`; it does nothing unless a callback
was installed with `reporting(callback)` (a context variable, so library use stays silent).
`StderrProgress` is the callback of `cdi audit`: one line per update, at most one every
`interval` seconds plus each phase's final one; on a TTY the line updates in place.
Reporting never touches the data or a random generator, so results are unchanged.
"""

from __future__ import annotations

import contextvars
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

Callback = Callable[[str, int, int, str], None]

_callback: contextvars.ContextVar[Callback | None] = contextvars.ContextVar("cdi_progress", default=None)


def report(phase: str, done: int, total: int, unit: str = "") -> None:
    """Tell the installed callback (if any) that `done` of `total` units of `phase` are done."""
    callback = _callback.get()
    if callback is not None:
        callback(phase, int(done), int(total), unit)


@contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    """Install `callback` for reports made inside the block (None silences them)."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


@contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Reports inside the block go to the current callback with their phase prefixed."""
    outer = _callback.get()
    if outer is None:
        yield
        return
    with reporting(lambda phase, done, total, unit: outer(f"{prefix}{phase}", done, total, unit)):
        yield


class StderrProgress:
    """Rate-limited progress lines, e.g. "permutation test: 300/1000 permutations"."""

    def __init__(self, stream: TextIO | None = None, interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self._open = False  # an in-place (TTY) line is on screen without its newline
        try:
            self._tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self._tty = False

    def __call__(self, phase: str, done: int, total: int, unit: str = "") -> None:
        now = self.clock()
        final = done >= total
        if not final and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        line = f"{phase}: {done}/{total}" + (f" {unit}" if unit else "")
        try:
            if self._tty:
                self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
                self._open = not final
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """End an in-place line left open (a phase that did not report its final step)."""
        if self._open:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._open = False
