"""How a CLI run shows its results: ``--output table|json|tsv|csv``, the result file, the progress line.

- ``table`` is for people: one row per VM, most urgent first, a summary and "What to do". It fits
  the terminal's width (``shutil.get_terminal_size``: ``COLUMNS``, else the terminal of stdout);
  written to a file or a pipe it is not cut. VM ids are shortened (``sub8/rg/name``) unless
  ``--full-ids``, which prints ids that paste into ``check`` and never cuts them.
- ``json`` is one object (:func:`result_document`), the same the ``--out FILE`` result file holds
  and ``--from`` reads back.
- ``tsv`` is as ``az --output tsv``: no header, one line per VM, values separated by tabs
  (knack's ``_TsvOutput``); a tab or line break inside a value becomes a space, so that a row
  stays one line.
- ``csv`` has a header and quotes as RFC 4180 says (``csv.QUOTE_MINIMAL``, CRLF line ends). A
  cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab or
  a carriage return: OWASP, "CSV Injection") gets a leading ``'``: the DETAIL column carries text
  the guest reported, which whoever controls the VM can choose.

tsv and csv carry the columns ``COLUMNS`` names, in that order.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from shared.model import Outcome
from shared.report import ORDER, as_table, detail, summary

FORMATS = ("table", "json", "tsv", "csv")
COLUMNS = ("id", "outcome", "reason", "detail", "hint")


@dataclass
class RunResult:
    """What one run ends with: its outcomes, the subscriptions it could not list, and whether it
    was interrupted (then ``outcomes`` are the VMs done so far, and those cut off in flight)."""

    mode: str
    outcomes: list[Outcome] = field(default_factory=list)
    listing_errors: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: str) -> str:
    """A csv cell a spreadsheet shows as text, never runs (see the module's docstring)."""
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


def result_document(result: RunResult) -> dict[str, Any]:
    """The JSON result: ``summary``, ``vms`` (most urgent first), ``mode``, ``listingErrors`` and
    ``interrupted`` (README, "The JSON result")."""
    ordered = _ordered(result.outcomes)
    return {
        "summary": summary(result.outcomes),
        "vms": [o.as_dict() for o in ordered],
        "mode": result.mode,
        "listingErrors": dict(result.listing_errors),
        "interrupted": result.interrupted,
    }


def render(result: RunResult, output: str, *, full_ids: bool = False, width: int | None = None) -> str:
    """The text ``--output`` prints on stdout (without a final newline)."""
    if output == "json":
        return json.dumps(result_document(result), indent=2)
    if output == "tsv":
        return "\n".join("\t".join(_flat(v) for v in _row(o)) for o in _ordered(result.outcomes))
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        writer.writerows([_inert(v) for v in _row(o)] for o in _ordered(result.outcomes))
        return buffer.getvalue().removesuffix("\r\n")
    if output != "table":
        raise ValueError(f"unknown output format {output!r}")
    fit = terminal_width() if width is None else width
    text = as_table(result.outcomes, mode=result.mode, full_ids=full_ids, width=fit)
    if result.interrupted:
        text += (
            "\n\nInterrupted: these are the VMs done so far; no VM was started after the signal. "
            "A VM marked 'interrupted' was cut off while in flight: a Run Command may still be running in it."
        )
    return text


def terminal_width() -> int:
    """The width to fit the table into: ``COLUMNS``, else the terminal's; 0 (no limit) for a file or pipe."""
    return shutil.get_terminal_size((0, 0)).columns


def _ordered(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return sorted(outcomes, key=lambda o: (ORDER.index(o.kind), o.vm_id.lower()))


def _row(o: Outcome) -> list[str]:
    return [o.vm_id, o.kind.value, o.reason, detail(o, limit=None), o.hint]


def _flat(value: str) -> str:
    return " ".join(value.replace("\t", " ").splitlines())


class Progress:
    """The progress line on stderr: VMs done of the total, an ETA, counts so far.

    On a terminal it is rewritten in place every ``every_s`` seconds and cleared at the end;
    otherwise (a log file, CI) one line every 10 s. The total is known up front for ``check``,
    ``apply`` and ``--from``; a sweep's grows while it lists (``20/45+``), and the ETA shows once
    the listing is complete: (elapsed / done) x (left), the pace so far.
    """

    def __init__(self, stream: TextIO, *, total: int | None = None, every_s: float = 2.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = every_s if self._tty else 10.0
        self._started = time.monotonic()
        self._last = self._started
        self._done: list[Outcome] = []
        self._total = total or 0
        self._final = total is not None
        self._shown = False

    def listed(self, count: int = 1) -> None:
        """``count`` more VMs found by the listing."""
        self._total += count

    def listing_done(self) -> None:
        self._final = True

    def on_outcome(self, outcome: Outcome) -> None:
        self._done.append(outcome)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._started
        done = len(self._done)
        total = max(self._total, done)
        of = f"{done}/{total}" + ("" if self._final else "+")
        if not self._final:
            eta = "ETA after the listing"
        elif done == 0:
            eta = "ETA unknown"
        else:
            eta = f"ETA {_duration(elapsed / done * (total - done))}"
        counts = ", ".join(f"{k} {v}" for k, v in summary(self._done).items())
        return f"[{elapsed:5.0f}s] {of} VMs done, {eta}" + (f": {counts}" if counts else "")

    def note(self, text: str) -> None:
        """A line shown at once (a wait before the run's own retry: why nothing moves for a while)."""
        now = time.monotonic()
        self._last = now
        self._write(f"[{now - self._started:5.0f}s] {text}")

    def close(self) -> None:
        if self._tty and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def _write(self, line: str) -> None:
        self._shown = True
        self._stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
        self._stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def counts_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
