"""Exit codes a script can act on (issue 10, item 12), as a script sees them: the CLI as a subprocess.

0 all done, 1 some VM failed (or a VM you named does not exist), 2 usage/config/credential, 3 nothing
failed but some VM is still deferred after the run's own retries (shared/exitcodes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.cli import build_parser
from shared.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_RETRY_LATER, EXIT_USAGE

ROOT = Path(__file__).resolve().parent.parent
_VMS = "providers/Microsoft.Compute/virtualMachines"
HEALTHY = (
    f"/subscriptions/3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10/resourceGroups/rg-prod-apps/{_VMS}/kms-2019-dc-01"
)
NO_AGENT = f"/subscriptions/c7e09a3d-2f18-4b65-8e4c-5d9a0b1f7e26/resourceGroups/rg-dev-apps/{_VMS}/avma-2022-dc-noagent"
PS2 = f"/subscriptions/8d41f6b2-95c3-4a8e-b7d0-1c6e2f3a9b54/resourceGroups/rg-migrated-legacy/{_VMS}/legacy-2008r2-dc-ps2"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _finish(_start(*args))


CASES = [
    (["check", HEALTHY, "--simulate"], EXIT_OK, ("healthy", "kms-client-licensed")),
    # deferred: exit 3 (it was 0); the hint says to run again, not that it is retried
    (["check", NO_AGENT, "--simulate", "--apply"], EXIT_RETRY_LATER, ("deferred", "agent-not-ready")),
    (["check", PS2, "--simulate"], EXIT_FAILED, ("failed", "powershell-version")),
    (["check", "vm-01", "--simulate"], EXIT_USAGE, None),
]


def test_each_exit_code_as_a_script_sees_it() -> None:
    """The table of shared/exitcodes.py, one process per code: a script tells the four apart."""
    seen: dict[int, subprocess.CompletedProcess[str]] = {}
    # The four processes run at once (each waits on its own simulator most of the time).
    started = [_start(*args, "--output", "json") for args, _, _ in CASES]
    finished = [_finish(proc) for proc in started]
    for (args, code, outcome), done in zip(CASES, finished, strict=True):
        assert done.returncode == code, (args, done.stderr)
        seen[code] = done
        if code == EXIT_USAGE:
            assert done.stdout == "" and done.stderr.startswith("avma-remediator: ")
            continue
        assert [(v["outcome"], v["reason"]) for v in json.loads(done.stdout)["vms"]] == [outcome]
    later = seen[EXIT_RETRY_LATER]
    hint = json.loads(later.stdout)["vms"][0]["hint"]
    assert "run again later" in hint and "retried" not in hint
    assert "avma-remediator: 1 VM still deferred: run again later" in later.stderr


def test_help_lists_the_exit_codes() -> None:
    done = _cli("--help")
    assert done.returncode == 0
    for line in (
        "exit codes:",
        "0    all done",
        "1    some VM failed, a VM you named does not exist, or a subscription could not be listed",
        "2    usage, configuration or credential error: nothing was checked",
        "3    nothing failed, but some VM must be retried later",
        "130  interrupted",
    ):
        assert line in done.stdout, line
    # the run commands' own --help says the same
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("sweep", "check"):
        assert "3    nothing failed, but some VM must be retried later" in subcommands[name].format_help()


def test_a_deferred_vm_does_not_hide_a_failed_one_nor_a_missing_one() -> None:
    from shared.exitcodes import run_exit_code
    from shared.model import Outcome, OutcomeKind

    deferred = Outcome(NO_AGENT, OutcomeKind.DEFERRED, "agent-not-ready")
    failed = Outcome(PS2, OutcomeKind.FAILED, "powershell-version")
    healthy = Outcome(HEALTHY, OutcomeKind.HEALTHY, "kms-client-licensed")
    assert run_exit_code([deferred, failed]) == EXIT_FAILED
    assert run_exit_code([deferred], named_missing=True) == EXIT_FAILED
    assert run_exit_code([deferred], listing_errors=True) == EXIT_FAILED
    assert run_exit_code([deferred, healthy]) == EXIT_RETRY_LATER
    assert run_exit_code([healthy]) == run_exit_code([]) == EXIT_OK
