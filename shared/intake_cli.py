"""``avma-remediator intake FILE|-``: show the work items a payload would produce, without acting.

Lets an operator replay a captured Event Grid event, alert or query response and see exactly what
the triggers would enqueue (samples/intake/ has one of each to try). Exit 0 with ``[]`` when the
payload is irrelevant (the reasons go to stderr), 2 when it cannot be read, is not JSON or is
malformed.
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
        what = _what_it_is(payload)
        if what:
            print(f"{_PROG}: {name} {what}", file=stderr)
        return EXIT_USAGE
    for reason in result.ignored:
        print(f"ignored: {reason}", file=stderr)
    print(json.dumps([item.to_dict() for item in result.items], indent=2), file=stdout)
    return EXIT_OK


def _what_it_is(payload: object) -> str:
    """What a well-known non-payload is, and where the payload it stands for is (or ``""``).

    The public samples this project keeps (tests/data/samples) include two such shapes: the
    ``alertContext`` alone, as the common alert schema's documentation shows it, and a REST API
    specification example, whose response body is at ``responses.200.body``. samples/intake/ has
    whole payloads made from them.
    """
    if not isinstance(payload, dict):
        return ""
    if "alertContext" in payload and "schemaId" not in payload and "data" not in payload:
        return (
            "is only the alertContext of a common-schema alert: intake needs the whole alert an action "
            "group posts (schemaId, data.essentials, data.alertContext), as in "
            "samples/intake/alert-log-v2-computer.json"
        )
    responses = payload.get("responses")
    if isinstance(responses, dict) and "parameters" in payload:
        return (
            "is a REST API specification example, not a payload: the response it shows is at "
            "responses.200.body (samples/intake/loganalytics-query-response.json is that body)"
        )
    return ""
