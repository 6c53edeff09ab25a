"""Progress on long command-line work: drawn on a terminal's stderr, quiet in CI and when piped.

Training, `models publish`, `predlog archive`, `loadtest.bench` and `loadtest.gpu_bench` take
a `Progress` as an argument and report through it; `QUIET` draws nothing, so library code and
tests need not care. Whether a command shows progress is decided once, by `decide`, first
rule that applies:

    --no-progress, SWITCHYARD_PROGRESS=0      off
    --progress, SWITCHYARD_PROGRESS=1         on: bars where they can be redrawn, else lines
    CI set (anything but "", "0", "false")    off: CI logs are files, not screens
    stderr not a terminal (piped, a file)     off
    TERM=dumb (Emacs shell, some IDEs)        plain lines: no carriage-return redraws there
    otherwise                                 bars (tqdm), redrawn in place

Progress only ever goes to the stream it was made for (stderr): stdout, which scripts and
tests parse, is the same whatever is decided. Nothing here is coloured, so NO_COLOR needs no
rule of its own (it asks for no colour, not for no redraws).
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

ENV = "SWITCHYARD_PROGRESS"
#: Seconds between two status lines in plain-line mode (bars redraw on their own clock).
LINE_INTERVAL_S = 5.0
_NO = frozenset({"", "0", "false", "no", "off"})


class Mode(enum.Enum):
    OFF = "off"
    LINES = "lines"  # a status line now and then: for terminals that cannot redraw
    BARS = "bars"


def _truthy(value: str) -> bool:
    return value.strip().lower() not in _NO


def decide(isatty: bool, environ: Mapping[str, str], flag: bool | None = None) -> Mode:
    """How to show progress on a stream (`isatty`: is it a terminal) under `environ`.

    `flag` is the command line's --progress (True) / --no-progress (False); None: not given,
    then SWITCHYARD_PROGRESS, then the CI and terminal rules of the module docstring."""
    if flag is None and environ.get(ENV, "").strip():
        flag = _truthy(environ[ENV])
    if flag is False:
        return Mode.OFF
    redraws = isatty and environ.get("TERM", "").strip().lower() != "dumb"
    if flag is True:  # asked for: even into a file, but as lines where \r would be garbage
        return Mode.BARS if redraws else Mode.LINES
    if _truthy(environ.get("CI", "")) or not isatty:
        return Mode.OFF
    return Mode.BARS if redraws else Mode.LINES


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: on a terminal, unless CI or SWITCHYARD_PROGRESS=0)",
    )


class Task:
    """One piece of work being counted: `advance` by what was done, `note` what is going on."""

    def advance(self, n: float = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class _Lines(Task):
    def __init__(
        self,
        out: TextIO,
        desc: str,
        total: float | None,
        unit: str,
        scale: bool,
        clock: Callable[[], float],
    ) -> None:
        self.out, self.desc, self.total, self.unit, self.scale = out, desc, total, unit, scale
        self.clock = clock
        self.done: float = 0
        self.text = ""
        self.started = self.last = clock()
        self._line()

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.clock() - self.last >= LINE_INTERVAL_S:
            self._line()

    def note(self, text: str) -> None:
        self.text = text

    def close(self) -> None:
        self.text = f"done in {self.clock() - self.started:.1f} s"
        self._line()

    def _line(self) -> None:
        self.last = self.clock()
        count = _amount(self.done, self.scale)
        if self.total is not None:
            count += f"/{_amount(self.total, self.scale)}"
        unit = self.unit if self.scale else f" {self.unit}"  # 7.83k/1.20MB, 3/4 model
        self.out.write(f"{self.desc}: {count}{unit}" + (f" ({self.text})" if self.text else ""))
        self.out.write("\n")
        self.out.flush()


def _amount(n: float, scale: bool) -> str:
    if scale:
        from tqdm import tqdm

        return tqdm.format_sizeof(n)
    return str(int(n)) if n == int(n) else f"{n:g}"  # 1500000 entries, not 1.5e+06


class _Bar(Task):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, n: float = 1) -> None:
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)


class Progress:
    """Where and how progress is shown; `task` and `track` open the things being counted."""

    def __init__(
        self, mode: Mode, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.mode = mode
        self.stream = stream
        self.clock = clock

    @classmethod
    def for_stream(
        cls,
        stream: TextIO | None = None,
        flag: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Progress:
        """Progress on `stream` (default: stderr), decided from the terminal and environment."""
        out = stream if stream is not None else sys.stderr
        try:
            isatty = out.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            isatty = False
        return cls(decide(isatty, os.environ if environ is None else environ, flag), out)

    @property
    def shown(self) -> bool:
        return self.mode is not Mode.OFF

    @contextmanager
    def task(
        self, desc: str, total: float | None = None, unit: str = "it", unit_scale: bool = False
    ) -> Iterator[Task]:
        """Count one piece of work; `unit_scale` shows amounts as k/M/G (bytes: unit="B")."""
        out = self.stream if self.stream is not None else sys.stderr
        if self.mode is Mode.OFF:
            yield Task()
        elif self.mode is Mode.LINES:
            lines = _Lines(out, desc, total, unit, unit_scale, self.clock)
            yield lines
            lines.close()
        else:
            from tqdm import tqdm

            # leave=False: the bar is wiped when done; what remains on screen is the output.
            with tqdm(
                total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=out, leave=False,
                dynamic_ncols=True, mininterval=0.2, disable=False,
            ) as bar:  # fmt: skip
                yield _Bar(bar)

    def track(
        self,
        items: Iterable[T],
        desc: str,
        unit: str = "it",
        note: Callable[[T], str] | None = None,
    ) -> Iterator[T]:
        """Yield `items`, counting each one done; `note(item)` says which is being worked on."""
        total = len(items) if isinstance(items, Sized) else None
        with self.task(desc, total, unit) as task:
            for item in items:
                if note is not None:
                    task.note(note(item))
                yield item
                task.advance()

    def echo(self, line: str) -> None:
        """Print `line` on the progress stream, whatever the mode (a line the command prints
        anyway), without tearing a bar that is being drawn."""
        out = self.stream if self.stream is not None else sys.stderr
        if self.mode is Mode.BARS:
            from tqdm import tqdm

            tqdm.write(line, file=out)
            out.flush()
        else:
            print(line, file=out, flush=True)


#: Draws nothing: the default wherever progress is optional (library calls, tests).
QUIET = Progress(Mode.OFF)
