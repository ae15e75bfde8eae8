"""Progress bars that read well wherever they go: tqdm's bar on a terminal (or in a notebook), and off one (a CI
log, `nohup`, a Ray job's log) a plain line at every tenth of the work, never the carriage-return frames a bar
redraws itself with, which would be most of a log's bytes."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm

IN_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__)  # tqdm.auto chose a widget
LOG_STEPS = 10  # lines a bar of known length writes to a log: one per tenth, and the last
LOG_EVERY_S = 60.0  # a bar of unknown length writes a line a minute
LOG_CHECK_S = 1.0  # how often tqdm asks whether a line is due (its `mininterval`)
LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LogLines(tqdm):
    """A tqdm bar that writes whole lines, at each tenth of its total (a minute apart without one) and once at
    its close, with no bar drawing and no clearing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._said: int | None = None
        if kwargs.get("total") is not None and "bar_format" not in kwargs:
            kwargs["bar_format"] = LINE
        kwargs.setdefault("mininterval", LOG_CHECK_S)
        super().__init__(*args, **kwargs)

    def _step(self) -> int:
        if self.total:
            return min(LOG_STEPS, int(self.n * LOG_STEPS // self.total))
        return int((self._time() - self.start_t) // LOG_EVERY_S)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing or hiding the bar: a log has nothing to clear
            return False
        step = self._step()
        if step != self._said:
            self._said = step
            self.fp.write(str(self).strip() + "\n")
            self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear in a log (tqdm clears bars around `tqdm.write` lines)."""

    def close(self) -> None:
        if not self.disable and getattr(self, "leave", True) and (self.total is None or self._said != self._step()):
            self._said = None  # where it stopped, with the time and rate
            self.display()
        self.leave = False  # tqdm's own close then writes nothing more
        super().close()


def progress_bar(*, leave: bool = True, disable: bool = False, **kwargs: Any) -> tqdm:
    """A progress bar for `kwargs` (tqdm's): a bar on a terminal or in a notebook, lines in a log. A bar that
    vanishes when done (`leave=False`, e.g. one epoch's batches) is left out of a log altogether."""
    terminal = sys.stderr.isatty() or IN_NOTEBOOK
    if terminal or disable:
        return auto_tqdm(leave=leave, disable=disable, **kwargs)
    return LogLines(leave=leave, disable=not leave, **kwargs)
