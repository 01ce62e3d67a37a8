"""Progress display that stays readable in a log file.

On a terminal, tqdm redraws one line with carriage returns. Written to a file (a CI log, ``> job.log``,
``accelerate launch`` piped through ``tee``), those redraws pile up into one huge line. :func:`progress_bar` returns a
normal tqdm bar on a terminal and otherwise a tqdm that writes one plain line every ``every_percent`` % of the total.
"""

from __future__ import annotations

import math
import sys
from typing import IO

from tqdm.auto import tqdm as terminal_tqdm
from tqdm.std import tqdm

LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LogLinesTqdm(tqdm):
    """tqdm that writes each refresh as its own line to ``log`` (no carriage return, no bar), every ``miniters`` steps.

    tqdm's own writes (the carriage returns and the newline of ``close``) go to a sink; tqdm's monitor thread, which
    would lower ``miniters`` after a slow step, is off for this class.
    """

    monitor_interval = 0

    def __init__(self, *args, log: IO[str], **kwargs):
        self._log = log
        self._last_printed = None
        super().__init__(*args, file=_Sink(), **kwargs)

    def display(self, msg=None, pos=None):
        if self.n != self._last_printed:
            if self._last_printed is not None or self.n != self.initial:  # the starting point itself is not news
                self._log.write(self.__str__() + "\n")
                self._log.flush()
            self._last_printed = self.n
        return True


class _Sink:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def progress_bar(
    total: int | None,
    initial: int = 0,
    desc: str = "",
    disable: bool = False,
    file: IO[str] | None = None,
    every_percent: float = 10.0,
) -> tqdm:
    """A progress bar over ``total`` steps starting at ``initial``: tqdm's bar when ``file`` (default stderr) is a
    terminal, else a line per ``every_percent`` % of ``total`` (and one at the end), e.g.
    ``train:  40% 400/1000 [00:52<01:18, 7.66it/s, loss=0.412]``. ``disable=True`` shows nothing."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return terminal_tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True, file=stream)
    if not 0 < every_percent <= 100:
        raise ValueError(f"every_percent must be in (0, 100], got {every_percent}")
    steps = max(1, math.ceil(total * every_percent / 100)) if total else 1
    return LogLinesTqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=disable,
        log=stream,
        miniters=steps,
        mininterval=0 if total else 30.0,  # without a total: a line per 30 s at most
        maxinterval=float("inf"),
        bar_format=LOG_FORMAT,
        dynamic_ncols=False,
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
