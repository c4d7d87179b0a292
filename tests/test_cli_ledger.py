"""One source of truth with the app (issue 10, item 14): with the storage settings, the CLI takes the
same per-VM lease as the app's worker and writes the same history rows, so a CLI ``check`` shows in
``/api/status``; without them it says once that it runs without the ledger. Azurite and the simulator."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shared import triggers
from shared.cli import _simulated_env, main
from shared.exitcodes import EXIT_RETRY_LATER, EXIT_USAGE
from shared.ledger import Ledger
from shared.model import VmId
from shared.settings import Settings
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB = "6f1d2c3b-4a5e-4f60-8a71-92b3c4d5e6f7"


def _id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"


AVMA, OTHER = _id("avma-01"), _id("avma-02")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict({"vms": [windows_vm(AVMA), windows_vm(OTHER)]}), latency_s=0.01) as s:
        yield s


@pytest.fixture
def env(sim: Simulator, azurite: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What an admin's shell has when it carries the app's storage settings (a table of its own)."""
    values = {k: v for k, v in _simulated_env(sim.env()).items() if v is not None}
    values.update(AzureWebJobsStorage=azurite.connection_string, LEDGER_TABLE="cli" + uuid.uuid4().hex[:12])
    monkeypatch.delenv("AZURE_CLIENT_ID", raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _status(env: dict[str, str]) -> dict[str, Any]:
    """What ``GET /api/status`` answers (function_app.status calls exactly this)."""
    return asyncio.run(triggers.status(recent=20, env=env))


def test_a_cli_check_takes_the_lease_and_shows_in_the_apps_status(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", AVMA, "--apply", "--yes", "--output", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"] == {"remediated": 1}
    assert "without the ledger" not in captured.err
    status = _status(env)
    assert (status["vms"], status["counts"]["remediated"], status["inProgress"]) == (1, 1, 0)
    rows = [r for r in status["recent"] if r["target"].lower() == AVMA.lower()]
    # newest first: the outcome, then the intent the CLI recorded before the remediation POST
    assert [(r["entry"], r["outcome"] or r["reason"]) for r in rows][:1] == [("outcome", "remediated")]
    assert any(r["entry"] == "intent" for r in rows)
    assert {r["trigger"] for r in rows} == {"manual"}
    assert all(r["correlationId"].startswith("cli:check:") for r in rows)


def test_a_vm_the_app_holds_is_left_alone_deferred_lease_held(
    sim: Simulator, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The app's worker is on AVMA (its lease is live): the CLI never runs beside it on that VM."""

    async def hold() -> None:
        async with Ledger.from_settings(Settings.from_env(env)) as ledger:
            await ledger.create_table_if_needed()
            assert await ledger.acquire(VmId.parse(AVMA), owner="worker-of-the-app") is not None

    asyncio.run(hold())
    code = main(["check", AVMA, OTHER, "--apply", "--yes", "--retry-wait", "0", "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    by_id = {v["id"]: (v["outcome"], v["reason"]) for v in out["vms"]}
    assert by_id == {AVMA: ("deferred", "lease-held"), OTHER: ("remediated", "avma-channel")}
    assert code == EXIT_RETRY_LATER  # nothing failed, one VM to run again later
    assert sim.run_log(AVMA) == []  # not one Run Command on the VM the app holds
    status = _status(env)
    assert status["inProgress"] == 1  # the app's lease is still there, untouched
    held = [r for r in status["recent"] if r["target"].lower() == AVMA.lower()]
    assert [(r["outcome"], r["reason"], r["trigger"]) for r in held] == [("deferred", "lease-held", "manual")]


def test_an_audit_by_hand_is_history_but_never_the_verdict(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A would-remediate from the CLI must not make the app's sweep skip the VM (RECHECK_AFTER_HOURS)."""
    assert main(["check", AVMA, "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"would-remediate": 1}

    async def read() -> tuple[Any, list[dict[str, Any]]]:
        async with Ledger.from_settings(Settings.from_env(env)) as ledger:
            return await ledger.last_verdict(VmId.parse(AVMA)), await ledger.history(VmId.parse(AVMA))

    verdict, history = asyncio.run(read())
    assert verdict is None
    assert [(h["entry"], h["outcome"]) for h in history] == [("outcome", "would-remediate")]
    assert _status(env)["inProgress"] == 0  # the lease was released


def test_without_storage_settings_it_says_once_that_it_runs_without_the_ledger(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in _simulated_env(sim.env()).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    for key in ("AzureWebJobsStorage", "AzureWebJobsStorage__tableServiceUri"):
        monkeypatch.delenv(key, raising=False)
    assert main(["sweep", "--output", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"] == {"would-remediate": 2}
    notes = [line for line in captured.err.splitlines() if "without the ledger" in line]
    assert notes == [
        "avma-remediator: running without the ledger (no AzureWebJobsStorage or "
        "AzureWebJobsStorage__tableServiceUri): no per-VM lease is taken, so do not run this beside the "
        "app on the same VMs, and nothing shows in /api/status"
    ]


def test_a_ledger_that_cannot_be_reached_stops_the_run_before_any_vm(
    sim: Simulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Storage configured but down: running without the lease beside the app is what the settings
    say not to do, so nothing is checked (exit 2)."""
    down = re.sub(
        r"TableEndpoint=http://127\.0\.0\.1:\d+",
        "TableEndpoint=http://127.0.0.1:9",
        env["AzureWebJobsStorage"],
    )
    monkeypatch.setenv("AzureWebJobsStorage", down)
    before = len(sim.request_log())
    assert main(["check", AVMA, "--apply", "--yes"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("avma-remediator: the ledger (storage settings) cannot be used: ")
    runs = [r for r in sim.request_log()[before:] if r["path"].endswith("/runCommand")]
    assert runs == []
