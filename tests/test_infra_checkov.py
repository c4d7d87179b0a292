"""checkov over infra/: zero parsing errors, no failed checks, every suppression justified inline.

checkov (its own venv, .venv-checkov, made by `make test`; it pins pycep-parser 0.5.1) skips a file
it cannot parse without failing, so the summary's parsing_errors must be asserted. A missing checkov
fails here: CI must run it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.test_infra_lib import INFRA, ROOT, bicep_files

CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
SKIP = re.compile(r"//\s*checkov:skip=([A-Z0-9_]+):(.*)")


def run_checkov(directory: Path) -> dict[str, Any]:
    if not CHECKOV.is_file():
        pytest.fail(
            f"checkov is not installed at {CHECKOV}: run `make test` (it creates .venv-checkov), "
            "or point CHECKOV at a checkov executable",
            pytrace=False,
        )
    run = subprocess.run(
        [str(CHECKOV), "-d", str(directory), "--framework", "bicep", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode in (0, 1), f"checkov crashed (exit {run.returncode}): {run.stderr[-2000:]}"
    data = json.loads(run.stdout)
    reports = data if isinstance(data, list) else [data]
    (report,) = [r for r in reports if r.get("check_type", "bicep") == "bicep"]
    return dict(report)


@cache
def report() -> dict[str, Any]:
    return run_checkov(INFRA)


def test_checkov_parses_every_file() -> None:
    summary = report()["summary"]
    assert summary["parsing_errors"] == 0, "checkov could not parse a file and silently skipped it"
    assert summary["resource_count"] >= len(bicep_files())
    results = report()["results"]
    scanned = {
        c["file_path"].lstrip("/")
        for kind in ("passed_checks", "failed_checks", "skipped_checks")
        for c in results[kind]
    }
    # the files checkov has checks for: storage, the Function App, and the custom role definitions
    assert {"app/storage.bicep", "app/api.bicep", "app/vm-access.bicep", "management-group.bicep"} <= scanned


def test_no_failed_checks() -> None:
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report()["results"]["failed_checks"]
    ]
    assert failed == [], "fix these, or suppress one with //checkov:skip=ID:why inside the resource"


def test_every_suppression_is_justified_inline() -> None:
    skipped = report()["results"]["skipped_checks"]
    for check in skipped:
        comment = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(comment) >= 40, f"{check['check_id']} on {check['resource']} needs a real reason"
    written = [match for path in bicep_files() for match in SKIP.findall(path.read_text())]
    assert len(written) == len(skipped), "a skip comment that checkov did not apply is stale"
    assert all(reason.strip() for _, reason in written)


def test_a_file_checkov_cannot_parse_is_counted(tmp_path: Path) -> None:
    """The guard above works: a lambda (beyond checkov's pycep 0.5.1) is a parsing error, not a pass."""
    (tmp_path / "lambda.bicep").write_text(
        "param names array = []\n"
        "var upper = map(names, n => toUpper(n))\n"
        "resource id 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {\n"
        "  name: 'x'\n"
        "  location: 'westeurope'\n"
        "}\n"
    )
    assert run_checkov(tmp_path)["summary"]["parsing_errors"] == 1
