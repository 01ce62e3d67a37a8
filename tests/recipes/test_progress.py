"""recipes/common/progress.py: tqdm on a terminal, one plain line per N % in a log."""

import io
import re

import pytest

from recipes.common.progress import LogLinesTqdm, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(bar, steps):
    for step in range(steps):
        bar.update(1)
        bar.set_postfix({"loss": f"{1 / (step + 1):.3f}"}, refresh=False)
    bar.close()


def test_log_gets_one_line_per_ten_percent_and_no_carriage_returns():
    log = io.StringIO()
    run(progress_bar(total=95, desc="train", file=log), 95)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [int(re.match(r"train: +(\d+)% (\d+)/95 ", line).group(2)) for line in lines] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert lines[-1].startswith("train: 100% 95/95 [") and lines[-1].endswith(", loss=0.011]")


def test_resumed_run_counts_from_its_starting_step_and_prints_it_once_finished():
    log = io.StringIO()
    run(progress_bar(total=1000, initial=350, desc="resume", file=log, every_percent=25), 650)
    assert [line.split()[2] for line in log.getvalue().splitlines()] == ["600/1000", "850/1000", "1000/1000"]


def test_terminal_gets_the_redrawn_tqdm_bar_and_disable_shows_nothing():
    terminal = Terminal()
    bar = progress_bar(total=10, desc="train", file=terminal)
    assert not isinstance(bar, LogLinesTqdm)
    run(bar, 10)
    assert "\r" in terminal.getvalue()
    log = io.StringIO()
    run(progress_bar(total=10, desc="train", file=log, disable=True), 10)
    assert log.getvalue() == ""


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match=r"every_percent must be in \(0, 100\], got 0"):
        progress_bar(total=10, file=io.StringIO(), every_percent=0)
