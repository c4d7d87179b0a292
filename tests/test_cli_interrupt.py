"""Ctrl-C and SIGTERM during a run (issue 10, item 3), the CLI as a process: no new VM starts, the
Run Commands in flight finish, the results so far are printed and written, exit 130; and every VM
the simulator's own state shows changed is in those results."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.interrupt import Interrupt, Interruptible
from shared.model import Outcome, OutcomeKind, VmId

ROOT = Path(__file__).resolve().parent.parent


class Cli:
    """``python -m shared ARGS`` with its stderr read line by line while it runs."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared", *args],
            cwd=cwd,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._out: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self._out.append(self.proc.stdout.read())

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        self.proc.kill()
        raise AssertionError(f"{text!r} never appeared on stderr:\n{''.join(self.err)}")

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        for _ in range(50):
            if self._out:
                break
            time.sleep(0.02)
        time.sleep(0.05)
        return code, "".join(self._out), "".join(self.err)


def _changed(state: dict[str, Any]) -> set[str]:
    return {vm_id.lower() for vm_id, vm in state.items() if vm.get("changed")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_apply_keeps_the_record_of_every_vm_it_changed(tmp_path: Path, sig: int) -> None:
    cli = Cli(
        [
            "sweep",
            "--simulate",
            "--apply",
            "--sim-latency",
            "0.4",
            "--concurrency",
            "4",
            "--output",
            "json",
            "--out",
            "result.json",
            "--sim-state-out",
            "state.json",
            "-v",
        ],
        tmp_path,
    )
    # A remediation has just been decided: its Run Command is about to go out, others are in flight.
    cli.wait_for(": decision: rekey")
    cli.proc.send_signal(sig)
    code, out, err = cli.finish()
    assert code == 130, err
    assert "starting no new VM" in err
    printed = json.loads(out)
    written = json.loads((tmp_path / "result.json").read_text())
    assert printed == written
    from tests.test_cli_readme import json_keys_documented

    assert json_keys_documented(printed) == []
    assert printed["interrupted"] is True
    by_id = {v["id"].lower(): v for v in printed["vms"]}
    state = json.loads((tmp_path / "state.json").read_text())
    assert 0 < len(by_id) < len(state)  # no new VM was started after the signal
    changed = _changed(state)
    assert changed, "the signal came after the first remediation was decided"
    # Every VM the simulator changed is in the record, and recorded as what happened to it.
    assert changed <= set(by_id), sorted(changed - set(by_id))
    for vm_id in changed:
        assert by_id[vm_id]["outcome"] in ("remediated", "failed"), by_id[vm_id]
        assert by_id[vm_id]["reason"] != "interrupted"
    # A VM stopped by the signal was not changed: it sent no Run Command after it.
    for vm_id, vm in by_id.items():
        if vm["reason"] == "interrupted":
            assert (
                vm_id not in changed
                and vm["outcome"] == "deferred"
                and vm["phase"] in ("detect", "remediate")
            )


def test_a_second_ctrl_c_stops_at_once_and_names_the_vms_still_in_flight(tmp_path: Path) -> None:
    """Run Commands of 30 s: the first Ctrl-C waits for them (up to 90 s), the second does not;
    the VMs cut off are ``deferred: interrupted``, with the warning that they may still change."""
    estate = tmp_path / "estate.json"
    sub = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"
    from tests.estates import windows_vm

    ids = [
        f"/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm{i}"
        for i in range(3)
    ]
    estate.write_text(json.dumps({"subscriptions": [sub], "vms": [windows_vm(i) for i in ids]}))
    cli = Cli(["sweep", "--simulate", str(estate), "--sim-latency", "30", "--output", "json", "-v"], tmp_path)
    cli.wait_for(": gate: ")
    time.sleep(0.3)  # the detections are posted
    started = time.monotonic()
    cli.proc.send_signal(signal.SIGINT)
    cli.wait_for("starting no new VM")
    cli.proc.send_signal(signal.SIGINT)
    code, out, err = cli.finish(timeout=20)
    assert time.monotonic() - started < 10, "the second Ctrl-C did not stop the run at once"
    assert code == 130, err
    assert "stopping at once" in err
    result = json.loads(out)
    assert result["interrupted"] is True
    assert sorted(v["id"] for v in result["vms"]) == sorted(ids)
    for vm in result["vms"]:
        assert (vm["outcome"], vm["reason"]) == ("deferred", "interrupted")
        assert "may still change it" in vm["hint"]


class _Slow:
    """A checker whose every VM takes ``seconds``; it counts the VMs it started."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, 0

    async def check(
        self, vm_id: VmId, *, listed: object = None, before_run_command: object = None
    ) -> Outcome:
        import asyncio

        self.started += 1
        await asyncio.sleep(self.seconds)
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "kms-client-licensed")


async def test_the_wait_for_vms_in_flight_is_bounded() -> None:
    """When the bound passes, the run ends anyway, and the VMs still in flight are reported."""
    import asyncio
    import io

    from shared.resume import run_each

    vm_ids = [
        VmId.parse(
            f"/subscriptions/{'1' * 8}-2222-4333-8444-{'5' * 12}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm{i}"
        )
        for i in range(6)
    ]
    slow = _Slow(5.0)
    interrupt = Interrupt(io.StringIO(), grace_s={int(signal.SIGINT): 0.2})
    done: list[Outcome] = []

    async def fire() -> None:
        await asyncio.sleep(0.1)
        interrupt.trigger(signal.SIGINT)

    began = time.monotonic()
    asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(fire()))
    result, cut = await interrupt.run(
        run_each(Interruptible(slow, interrupt), vm_ids, concurrency=2, on_outcome=done.append)
    )
    assert time.monotonic() - began < 1.5
    assert result is None and done == []
    assert slow.started == 2  # the other four were never started
    assert sorted(o.vm_id for o in cut) == sorted(str(v) for v in vm_ids[:2])
    assert {(o.kind, o.reason) for o in cut} == {(OutcomeKind.DEFERRED, "interrupted")}


SIGTERM_AT_START = """
import os, signal, sys, time
import simulator
from shared.cli import main

start = simulator.Simulator.start

def start_then_terminated(self):
    sim = start(self)
    os.kill(os.getpid(), signal.SIGTERM)  # as an orchestrator would, before the run's own handlers
    time.sleep(2)  # not reached when SIGTERM unwinds
    return sim

simulator.Simulator.start = start_then_terminated
sys.exit(main(["sweep", "--simulate", "--sim-latency", "0.01"]))
"""


def test_sigterm_before_the_run_handles_signals_unwinds_and_leaves_no_simulator_files(tmp_path: Path) -> None:
    """A SIGTERM while the simulator starts (before the loop's handlers exist) is exit 130, said in
    one line, and the simulator's temporary directory (its CA, its key) is removed; on the code
    before, the process died of the signal (-15) and left the directory behind."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_START],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "avma-remediator: interrupted"
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("avma-sim-*"))
