"""``avma-remediator intake FILE|-``: show the work items a payload would produce, without acting.

Lets an operator replay a captured Event Grid event, alert or query response and see exactly what
the triggers would enqueue. Exit 0 with ``[]`` when the payload is irrelevant (the reasons go to
stderr), 2 when it cannot be read, is not JSON or is malformed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from shared.exitcodes import EXIT_OK, EXIT_USAGE
from shared.intake import IntakeError, from_payload

_PROG = "avma-remediator intake"


def run_intake(
    path: str, *, stdin: TextIO, stdout: TextIO, stderr: TextIO, now: datetime | None = None
) -> int:
    """Read ``path`` (``-`` for stdin), print its work items as a JSON array, return the exit code."""
    name = "stdin" if path == "-" else path
    try:
        text = stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        print(f"{_PROG}: cannot read {name}: {error}", file=stderr)
        return EXIT_USAGE
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        print(
            f"{_PROG}: {name} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
            file=stderr,
        )
        return EXIT_USAGE
    except RecursionError:
        print(f"{_PROG}: {name} is nested too deeply to be a payload", file=stderr)
        return EXIT_USAGE
    try:
        result = from_payload(payload, now=now or datetime.now(UTC))
    except IntakeError as error:
        print(f"{_PROG}: {name}: {error}", file=stderr)
        return EXIT_USAGE
    for reason in result.ignored:
        print(f"ignored: {reason}", file=stderr)
    print(json.dumps([item.to_dict() for item in result.items], indent=2), file=stdout)
    return EXIT_OK
