"""Review of issue 10: hand mutants of the CLI's decisions that no test killed, and small defects
seen as a user would (a closed stdin, a tsv of no VM).

Mutants killed here (each survived tests/test_cli*.py on main):

- the edited-plan check compared only the action, not the reason the plan shows for it;
- the question before a change went ahead on any answer but "no" (an empty line, end of input);
- the question was asked even with ``--yes`` at a terminal;
- after a signal, a VM whose detection was done still sent its remediation;
- a management group with no way to check membership was taken as "in scope".
"""

from __future__ import annotations

import io
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main
from shared.plan import Plan, PlanError, confirm, plan_from_dict
from shared.settings import Settings
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"


def _id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"


def _estate(tmp_path: Path) -> Path:
    vms = [windows_vm(_id("vm-a")), windows_vm(_id("vm-ok"), channel="KMS_CLIENT")]
    path = tmp_path / "estate.json"
    path.write_text(json.dumps({"subscriptions": [SUB], "vms": vms}))
    return path


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    estate, plan = _estate(tmp_path), tmp_path / "plan.json"
    assert main(["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--out-plan", str(plan)]) == 0
    capsys.readouterr()
    return estate, plan


def test_a_plan_whose_reason_was_edited_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer reads the reason; a row whose reason is not the decision table's, on the
    row's own facts, is an edited row, even when its action is the table's."""
    _, plan = _plan(tmp_path, capsys)
    data: dict[str, Any] = json.loads(plan.read_text())
    row = next(v for v in data["vms"] if v["action"] == "rekey")
    row["reason"] = "kms-client-unlicensed"  # a reason of the table, not this row's
    settings = Settings.from_env({"TARGET_SUBSCRIPTIONS": SUB})
    with pytest.raises(PlanError, match="the plan says rekey \\(kms-client-unlicensed\\)"):
        plan_from_dict(data, settings, simulated=True, now=datetime.now(UTC))


def _empty_plan() -> Plan:
    return Plan(datetime.now(UTC), {}, {}, simulated=True)


@pytest.mark.parametrize(
    ("typed", "go"),
    [("yes\n", True), ("y\n", False), (" YES \n", True), ("\n", False), ("", False), ("ok\n", False)],
    ids=["yes", "y", "spaced-upper", "empty-line", "end-of-input", "anything-else"],
)
def test_only_yes_goes_ahead(typed: str, go: bool) -> None:
    err = io.StringIO()
    assert confirm(_empty_plan(), stdin=io.StringIO(typed), stderr=err, what="apply") is go
    assert "Type 'yes' to go ahead" in err.getvalue()


class _Terminal(io.StringIO):
    """A stdin that is a terminal, with an answer typed ahead."""

    def isatty(self) -> bool:
        return True


def test_yes_at_a_terminal_asks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    estate, plan = _plan(tmp_path, capsys)
    monkeypatch.setattr(sys, "stdin", _Terminal("no\n"))  # read only if it asked
    args = ["apply", str(plan), "--simulate", str(estate), "--sim-latency", "0.01", "--output", "json"]
    assert main([*args, "--yes"]) == 0
    captured = capsys.readouterr()
    assert "Apply?" not in captured.err
    assert json.loads(captured.out)["summary"] == {"remediated": 1}


def test_a_run_with_stdin_closed_is_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started with stdin closed (``<&-``), Python has ``sys.stdin`` None: an audit runs as
    without a terminal (on main: AttributeError, a traceback and exit 1)."""
    monkeypatch.setattr(sys, "stdin", None)
    estate = _estate(tmp_path)
    code = main(["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "--output", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"would-remediate": 1, "healthy": 1}
    assert main(["sweep", "--apply", "--subscription", SUB]) == 2  # on Azure: no terminal to ask on
    assert "there is no terminal to ask on: add --yes" in capsys.readouterr().err


def test_tsv_of_no_vm_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As ``az --output tsv`` (knack's ``_TsvOutput.dump``: one line per item, none for none), a
    run that found no VM prints no line; on main it printed one empty line, which a ``while read``
    loop reads as a row with an empty id."""
    estate = _estate(tmp_path)
    args = ["sweep", "--simulate", str(estate), "--sim-latency", "0.01", "-g", "rg-none", "--output", "tsv"]
    assert main(args) == 0
    assert capsys.readouterr().out == ""
    assert main([*args[:-1], "csv"]) == 0
    assert capsys.readouterr().out == "id,outcome,reason,detail,hint\n"  # csv keeps its header


class _TwoRunCommands:
    """A workflow that detects, then (the signal comes meanwhile) would remediate."""

    def __init__(self, interrupt: Any) -> None:
        self._interrupt = interrupt
        self.sent: list[str] = []

    async def check(self, vm_id: Any, *, listed: Any = None, before_run_command: Any = None) -> Any:
        from shared.model import Outcome, OutcomeKind

        for phase in ("detect", "remediate"):
            await before_run_command(phase, {})
            self.sent.append(phase)
            if phase == "detect":
                self._interrupt.trigger(signal.SIGINT)  # Ctrl-C while detection runs
        return Outcome(str(vm_id), OutcomeKind.REMEDIATED, "rekeyed")


async def test_after_a_signal_a_vm_in_flight_sends_no_further_run_command() -> None:
    """README: on the first signal "a VM in flight sends no further Run Command (one whose
    detection is done ends deferred: interrupted, unchanged)"."""
    from shared.interrupt import Interrupt, Interruptible
    from shared.model import OutcomeKind, VmId

    interrupt = Interrupt(io.StringIO())
    inner = _TwoRunCommands(interrupt)
    outcome = await Interruptible(inner, interrupt).check(VmId.parse(_id("vm-a")))
    assert inner.sent == ["detect"]
    assert (outcome.kind, outcome.reason, outcome.details) == (
        OutcomeKind.DEFERRED,
        "interrupted",
        {"phase": "remediate"},
    )
    assert "nothing in it was changed" in outcome.hint


async def test_a_management_group_without_a_lookup_is_out_of_scope_not_assumed() -> None:
    from shared.model import VmId
    from shared.scope import Scope

    vm = VmId.parse(_id("vm-a"))
    refused = await Scope(management_group="mg-servers").check(vm)
    assert refused is not None and refused.reason == "out-of-scope"
    assert "cannot tell whether the VM is in management group mg-servers" in refused.hint
    shouted = VmId.parse(_id("vm-a").replace(SUB, SUB.upper()))  # ARM ids ignore case
    assert await Scope(frozenset({SUB.lower()})).check(shouted) is None


def test_sweep_ids_naming_a_vm_that_does_not_exist_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ids`` names VMs as ``check`` does (README: "A VM you named (check VM_ID, --ids, …) that
    does not exist is a line on stderr and exit 1"), for ``sweep --ids`` too."""
    estate = _estate(tmp_path)
    typo = _id("vm-typo")
    args = ["sweep", "--ids", _id("vm-ok"), typo, "--simulate", str(estate), "--sim-latency", "0.01"]
    assert main([*args, "--output", "json"]) == 1
    captured = capsys.readouterr()
    assert f"VM {typo} does not exist" in captured.err
    assert {v["id"]: v["reason"] for v in json.loads(captured.out)["vms"]} == {
        _id("vm-ok"): "kms-client-licensed",
        typo: "not-found",
    }


def test_from_a_large_result_is_read_in_linear_time(tmp_path: Path) -> None:
    """``--from`` of a 10,000-VM result: on main each id was looked up in a list of those chosen so
    far (quadratic: over two minutes here before any VM ran); the order and dedupe are kept."""
    import time

    from shared.resume import DEFAULT_ONLY, vms_to_resume

    ids = [_id(f"vm-{i:05d}") for i in range(10_000)]
    rows = [{"id": vm, "outcome": "failed"} for vm in ids] + [{"id": ids[0].upper(), "outcome": "deferred"}]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"vms": rows}))
    started = time.monotonic()
    chosen = vms_to_resume(str(path), DEFAULT_ONLY)
    assert time.monotonic() - started < 5
    assert [str(vm) for vm in chosen] == ids  # file order, the upper-case repeat once


class _AnswersAfter(_Terminal):
    """A terminal whose person, while reading the counts, sees something change on the estate."""

    def __init__(self, answer: str, meanwhile: Any) -> None:
        super().__init__(answer)
        self._meanwhile = meanwhile

    def readline(self, size: int | None = -1) -> str:
        self._meanwhile()
        return super().readline()


def test_sweep_apply_at_a_terminal_applies_the_plan_it_showed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was confirmed is the plan the counts came from: a VM whose facts change between the
    question and the answer ends ``skipped: plan-changed``, as with ``apply PLAN`` (a mutant
    that remediated the VMs afresh after the answer survived every test on main)."""
    from shared.cli import _simulated_env
    from simulator import Estate, Simulator

    stopping = _id("vm-a")
    with Simulator(Estate.load(_estate(tmp_path)), latency_s=0.01) as sim:
        for key, value in _simulated_env(sim.env()).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        monkeypatch.setattr(
            sys, "stdin", _AnswersAfter("yes\n", lambda: sim.set_power_state(stopping, "stopped"))
        )
        code = main(["sweep", "--apply", "--output", "json", "--retry-wait", "0"])
        state = sim.state_dump()[stopping]
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "audit done: 1 VM to change (rekey 1)" in captured.err
    rows = {v["id"]: v for v in json.loads(captured.out)["vms"]}
    assert (rows[stopping]["outcome"], rows[stopping]["reason"]) == ("skipped", "plan-changed")
    assert rows[stopping]["changed"]["powerState"] == ["running", "stopped"]
    assert not state["changed"]
