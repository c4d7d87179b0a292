"""The per-VM workflow end to end: real azure-mgmt-compute and azure-identity over HTTPS to the simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from shared.azure.compute import ComputeGateway
from shared.azure.credentials import make_credential
from shared.model import OutcomeKind, VmId
from shared.settings import Mode, Settings
from shared.sweep import sweep
from shared.vm import VmFacts
from shared.workflow import Remediator
from simulator import Estate, Simulator
from tests.estates import windows_vm

SUB = "5b0e8d2c-1f6a-4c39-9d7e-2a4b6c8d0e1f"
GVLK_2022_DC_TAIL = "6VM33"  # WX4NM-KYWYW-QJJR4-XV3QB-6VM33, official table


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"


def windows(name: str, **options: Any) -> dict[str, Any]:
    return windows_vm(vm_id(name), **options)


def linux(name: str) -> dict[str, Any]:
    return {"id": vm_id(name), "os": "Linux", "powerState": "running", "agentReady": True, "tags": {}}


ESTATE = [
    windows("avma-dc"),
    windows("avma-unreachable", reachable=False),
    windows("avma-licensed-unreachable", status=1, reachable=False),
    windows("avma-off", power="deallocated"),
    windows("avma-agent-down", agent=False),
    windows("avma-opted-out", tags={"avma-remediator-opt-out": "true"}),
    windows("avma-odd", edition="ServerHypothetical", sku=999),
    windows(
        "multi-session",
        channel="KMS_CLIENT",  # AVMA is for Windows Server guests only
        edition="ServerRdsh",
        sku=175,
        build=22631,
        caption="Microsoft Windows 11 Enterprise multi-session",
    ),
    windows("kms-ok", channel="KMS_CLIENT", status=1, kms_host="azkms.core.windows.net:1688"),
    windows("kms-repair", channel="KMS_CLIENT", status=5, kms_host=None),
    windows("kms-custom", channel="KMS_CLIENT", status=0, kms_host="kms.contoso.local:1688"),
    windows("retail", channel="RETAIL", status=0),
    windows("mak", channel="MAK", status=1),
    windows("oem", channel="OEM", status=5),
    windows("busy", busySeconds=30),
    linux("lnx"),
]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict({"vms": ESTATE}), latency_s=0.02) as running:
        yield running


Engine = Callable[..., Any]


@pytest.fixture
async def engine(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Engine]:
    """Build a Remediator wired exactly as the CLI wires it: env → Settings → credential → gateway."""
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    gateways: list[ComputeGateway] = []
    credentials: list[Any] = []

    def build(mode: Mode = Mode.ENFORCE, **env: str) -> tuple[Remediator, ComputeGateway]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        import os

        settings = Settings.from_env(os.environ).with_mode(mode)
        credential = make_credential(settings)
        gateway = ComputeGateway(credential, settings)
        credentials.append(credential)
        gateways.append(gateway)
        return Remediator(gateway, settings), gateway

    yield build
    for gateway in gateways:
        await gateway.close()
    for credential in credentials:
        await credential.close()


async def check(engine: Engine, name: str, mode: Mode = Mode.ENFORCE, **env: str) -> Any:
    remediator, _ = engine(mode, **env)
    return await remediator.check(VmId.parse(vm_id(name)))


def state(sim: Simulator, name: str) -> dict[str, Any]:
    dump = sim.state_dump()
    return next(v for k, v in dump.items() if k.lower() == vm_id(name).lower())


async def test_avma_vm_is_rekeyed_activated_and_verified(engine: Engine, sim: Simulator) -> None:
    outcome = await check(engine, "avma-dc")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "avma-channel")
    assert outcome.details["edition"] == "Windows Server 2022 Datacenter"
    assert (outcome.details["channel"], outcome.details["channelAfter"]) == ("AVMA", "KMS_CLIENT")
    after = state(sim, "avma-dc")
    assert after["channel"] == "KMS_CLIENT"
    assert after["licenseStatus"] == 1
    assert after["partialProductKey"] == GVLK_2022_DC_TAIL
    assert after["kmsHost"] == "azkms.core.windows.net:1688"
    # ARM names the edition (osName Windows Server 2022 Datacenter) and the guest matches: the
    # first Run Command re-keys, on those conditions (issue 12); before, detection then remediation
    assert after["runCommands"] == 1
    assert outcome.details["conditionalRekey"] == {"edition": "Windows Server 2022 Datacenter", "met": True}


async def test_audit_mode_reports_and_changes_nothing(engine: Engine, sim: Simulator) -> None:
    before = state(sim, "avma-dc")
    outcome = await check(engine, "avma-dc", Mode.AUDIT)
    assert (outcome.kind, outcome.reason) == (OutcomeKind.WOULD_REMEDIATE, "avma-channel")
    after = state(sim, "avma-dc")
    assert after["runCommands"] == 1  # detection only
    assert {k: v for k, v in after.items() if k != "runCommands"} == {
        k: v for k, v in before.items() if k != "runCommands"
    }
    assert after["changed"] is False


async def test_unreachable_kms_fails_with_the_route_hint(engine: Engine, sim: Simulator) -> None:
    outcome = await check(engine, "avma-unreachable")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "activation-error:0xC004F074")
    assert "20.118.99.224/32" in outcome.hint and "next hop Internet" in outcome.hint
    after = state(sim, "avma-unreachable")
    # the GVLK is in place, so the VM activates by itself once the route is fixed
    assert (after["channel"], after["partialProductKey"], after["licenseStatus"]) == (
        "KMS_CLIENT",
        GVLK_2022_DC_TAIL,
        5,
    )


async def test_a_licensed_avma_vm_keeps_its_activation_while_the_kms_is_unreachable(
    engine: Engine, sim: Simulator
) -> None:
    before = state(sim, "avma-licensed-unreachable")
    outcome = await check(engine, "avma-licensed-unreachable")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.DEFERRED, "kms-unreachable")
    assert "20.118.99.224/32" in outcome.hint and "next hop Internet" in outcome.hint
    after = state(sim, "avma-licensed-unreachable")
    assert after["changed"] is False and after["runCommands"] == 1  # detection only
    assert (after["channel"], after["licenseStatus"], after["partialProductKey"]) == (
        "AVMA",
        1,
        before["partialProductKey"],
    )


async def test_audit_shows_the_kms_route_as_part_of_the_plan(engine: Engine, sim: Simulator) -> None:
    licensed = await check(engine, "avma-licensed-unreachable", Mode.AUDIT)
    assert (licensed.kind, licensed.reason) == (OutcomeKind.WOULD_REMEDIATE, "avma-licensed-kms-unreachable")
    assert "next hop Internet" in licensed.hint
    unlicensed = await check(engine, "avma-unreachable", Mode.AUDIT)
    assert (unlicensed.kind, unlicensed.reason) == (OutcomeKind.WOULD_REMEDIATE, "avma-kms-unreachable")
    assert "0xC004F074" in unlicensed.hint
    plain = await check(engine, "avma-dc", Mode.AUDIT)
    assert (plain.kind, plain.reason, plain.hint) == (OutcomeKind.WOULD_REMEDIATE, "avma-channel", "")
    for name in ("avma-licensed-unreachable", "avma-unreachable", "avma-dc"):
        assert state(sim, name)["changed"] is False


@pytest.mark.parametrize(
    ("name", "kind", "reason", "run_commands"),
    [
        ("lnx", OutcomeKind.SKIPPED, "not-windows", 0),
        ("avma-off", OutcomeKind.SKIPPED, "not-running", 0),
        ("avma-agent-down", OutcomeKind.DEFERRED, "agent-not-ready", 0),
        ("avma-opted-out", OutcomeKind.SKIPPED, "opted-out", 0),
        ("avma-odd", OutcomeKind.SKIPPED, "unknown-edition", 1),
        ("multi-session", OutcomeKind.SKIPPED, "multi-session", 1),
        ("kms-ok", OutcomeKind.HEALTHY, "kms-client-licensed", 1),
        ("kms-custom", OutcomeKind.SKIPPED, "custom-kms", 1),
        ("retail", OutcomeKind.SKIPPED, "channel-retail", 1),
        ("mak", OutcomeKind.HEALTHY, "mak-licensed", 1),
        ("oem", OutcomeKind.SKIPPED, "channel-oem", 1),
    ],
)
async def test_vms_that_must_be_left_alone_are_not_changed(
    engine: Engine, sim: Simulator, name: str, kind: OutcomeKind, reason: str, run_commands: int
) -> None:
    outcome = await check(engine, name)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    after = state(sim, name)
    assert after["changed"] is False
    assert after.get("runCommands", 0) == run_commands


async def test_kms_client_without_a_host_is_repaired_without_a_new_key(
    engine: Engine, sim: Simulator
) -> None:
    key_before = state(sim, "kms-repair")["partialProductKey"]
    outcome = await check(engine, "kms-repair")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "kms-client-unlicensed")
    assert "install-key" not in [name for name, _ in outcome.details["steps"]]
    after = state(sim, "kms-repair")
    assert (after["licenseStatus"], after["partialProductKey"]) == (1, key_before)


async def test_custom_kms_is_overridden_only_when_allowed(engine: Engine, sim: Simulator) -> None:
    outcome = await check(engine, "kms-custom", ALLOW_CUSTOM_KMS_OVERRIDE="true")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "custom-kms-overridden")
    assert state(sim, "kms-custom")["kmsHost"] == "azkms.core.windows.net:1688"


async def test_busy_run_command_is_deferred_not_forced(engine: Engine, sim: Simulator) -> None:
    outcome = await check(engine, "busy")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.DEFERRED, "run-command-busy")
    assert state(sim, "busy")["changed"] is False


async def test_a_vm_read_while_it_boots_is_deferred_then_fixed_once_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PowerState/starting (just created) is deferred with a hint, never a final not-running."""
    with Simulator(
        Estate.from_dict(
            {"vms": [windows("avma-new", power="starting"), windows("avma-odd-state", power="unknown")]}
        ),
        latency_s=0.02,
    ) as booting:
        for key, value in booting.env().items():
            monkeypatch.setenv(key, value)
        settings = Settings.from_env(booting.env()).with_mode(Mode.ENFORCE)
        async with make_credential(settings) as credential, ComputeGateway(credential, settings) as gateway:
            remediator = Remediator(gateway, settings)
            first = await remediator.check(VmId.parse(vm_id("avma-new")))
            odd = await remediator.check(VmId.parse(vm_id("avma-odd-state")))
            listed = await sweep(remediator, gateway.list_vms, [SUB], concurrency=2)
            booting.set_power_state(vm_id("avma-new"), "running")
            then = await remediator.check(VmId.parse(vm_id("avma-new")))
    assert (first.kind, first.reason) == (OutcomeKind.DEFERRED, "vm-starting")
    assert "starting" in first.hint
    assert (odd.kind, odd.reason) == (OutcomeKind.DEFERRED, "power-state-unknown")
    assert {(o.kind, o.reason) for o in listed.outcomes} == {
        (OutcomeKind.DEFERRED, "vm-starting"),
        (OutcomeKind.DEFERRED, "power-state-unknown"),
    }
    assert (then.kind, then.reason) == (OutcomeKind.REMEDIATED, "avma-channel")


async def test_vanished_vm_is_skipped_not_found(engine: Engine, sim: Simulator) -> None:
    sim.delete_vm(vm_id("avma-dc"))
    outcome = await check(engine, "avma-dc")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.SKIPPED, "not-found")


async def test_vm_deleted_between_detection_and_remediation(engine: Engine, sim: Simulator) -> None:
    remediator, gateway = engine()
    real_run = gateway.run_command
    calls = 0

    async def run_then_delete(vm: VmId, body: dict[str, Any]) -> tuple[str, str]:
        nonlocal calls
        calls += 1
        result = await real_run(vm, body)
        if calls == 1:
            sim.delete_vm(str(vm))
        return result

    gateway.run_command = run_then_delete  # type: ignore[method-assign]
    # A KMS client repair: detection, then remediation (an AVMA VM whose edition ARM names takes
    # one Run Command, with nothing between)
    outcome = await remediator.check(VmId.parse(vm_id("kms-repair")))
    assert (outcome.kind, outcome.reason, outcome.details["phase"]) == (
        OutcomeKind.SKIPPED,
        "not-found",
        "remediate",
    )


async def test_run_command_deadline_defers(engine: Engine, sim: Simulator) -> None:
    outcome = await check(engine, "avma-dc", RUN_COMMAND_TIMEOUT_SECONDS="0.01")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.DEFERRED, "run-command-timeout")


async def test_a_wrong_catalog_key_is_refused_by_windows_and_reported(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's Windows knows its own edition's key: a catalog mistake cannot go unnoticed."""
    import shared.decide
    from shared.catalog import CATALOG

    wrong = next(e for e in CATALOG if e.edition == "Windows Server 2022 Standard")
    monkeypatch.setattr(shared.decide, "select_key", lambda os_facts: wrong)
    outcome = await check(engine, "avma-dc")
    assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "key-install-error:0xC004F069")
    assert state(sim, "avma-dc")["channel"] == "AVMA"


async def test_sweep_takes_every_vm_to_one_outcome_and_never_overlaps_run_commands(
    engine: Engine, sim: Simulator
) -> None:
    remediator, gateway = engine()
    report = await sweep(remediator, gateway.list_vms, [SUB], concurrency=8)
    by_name = {VmId.parse(o.vm_id).name: o for o in report.outcomes}
    assert set(by_name) == {VmId.parse(v["id"]).name for v in ESTATE}
    assert len(report.outcomes) == len(ESTATE)
    assert by_name["avma-dc"].kind is OutcomeKind.REMEDIATED
    assert by_name["lnx"].reason == "not-windows"
    assert sim.max_concurrent_run_commands() <= 1
    # the engine itself caused no 409: the only conflict is the foreign Run Command on "busy"
    conflicts = {k.lower(): v for k, v in sim.counters()["conflicts"].items()}
    assert set(conflicts) <= {vm_id("busy").lower()}
    json.dumps([o.as_dict() for o in report.outcomes])  # every outcome is JSON-able


class CannedCompute:
    """A running, ready Windows VM whose Run Commands print the given lines, in order."""

    def __init__(self, *outputs: str) -> None:
        self.outputs = list(outputs)
        self.bodies: list[Mapping[str, Any]] = []

    async def get_vm(self, vm: VmId) -> VmFacts:
        return VmFacts(vm_id=vm, os_type="Windows", power_state="running", agent_ready=True, tags={})

    async def run_command(self, vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        self.bodies.append(body)
        return self.outputs.pop(0), ""


GUARD = (
    'AVMA-REMEDIATOR-RESULT {"schema":2,"script":"detect","os":null,"license":null,"kmsProbe":null,'
    '"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032",'
    '"message":"Windows PowerShell 2.0 is older than 3.0"}}'
)


async def test_windows_powershell_2_ends_in_its_own_reason_and_nothing_is_run_after_detection() -> None:
    compute = CannedCompute(GUARD)
    settings = Settings.from_env({}).with_mode(Mode.ENFORCE)
    outcome = await Remediator(compute, settings).check(VmId.parse(vm_id("ws2008r2")))
    assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "powershell-version")
    assert "WMF 5.1" in outcome.hint
    assert outcome.details["error"].startswith("powershell-version: 0x80070032")
    assert len(compute.bodies) == 1


def result_line(script: str, channel: str, status: int, attestation: dict[str, Any] | None, **kw: Any) -> str:
    """A contract-v2 result line of an Azure Edition 2022 VM (values as Windows reports them)."""
    token = {"AVMA": "VIRTUAL_MACHINE_ACTIVATION", "KMS_CLIENT": "VOLUME_KMSCLIENT"}[channel]
    doc = {
        "schema": 2,
        "script": script,
        "os": {
            "caption": "Microsoft Windows Server 2022 Datacenter: Azure Edition",
            "version": "10.0.20348",
            "build": 20348,
            "productType": 3,
            "sku": 407,
            "editionId": "ServerTurbine",
        },
        "license": {
            "name": "Windows(R), ServerTurbine edition",
            "description": f"Windows(R) Operating System, {token} channel",
            "productKeyChannel": None,
            "partialProductKey": "VMK3J" if channel == "AVMA" else "KHMXV",
            "licenseStatus": status,
            "graceMinutes": 0,
            "kmsMachine": None,
            "kmsPort": 0,
            "discoveredKmsMachine": None,
            "discoveredKmsPort": 0,
        },
        "kmsProbe": {"host": "azkms.core.windows.net", "port": 1688, "reachable": True, "error": None},
        "attestation": attestation,
        "steps": [],
        "error": None,
    }
    doc.update(kw)
    return "AVMA-REMEDIATOR-RESULT " + json.dumps(doc, separators=(",", ":"))


ALL_OK = [
    {"name": n, "hresult": "0x00000000"}
    for n in ("install-key", "clear-kms-cache", "set-kms-host", "set-kms-port", "refresh", "activate")
]


@pytest.mark.parametrize(
    ("attestation", "kind", "reason", "in_hint"),
    [
        (
            {"imdsReachable": True, "chainValid": True, "error": None},
            OutcomeKind.REMEDIATED,
            "avma-channel",
            "",
        ),
        (
            {"imdsReachable": False, "chainValid": None, "error": "timed out"},
            OutcomeKind.FAILED,
            "attestation-imds-unreachable",
            "169.254.169.254",
        ),
        (
            {"imdsReachable": True, "chainValid": False, "error": "PartialChain"},
            OutcomeKind.FAILED,
            "attestation-chain-invalid",
            "fclip.exe",
        ),
        (None, OutcomeKind.FAILED, "attestation-not-reported", "never counted as healthy"),
    ],
)
async def test_azure_edition_is_remediated_only_when_its_attestation_passes_after_the_rekey(
    attestation: dict[str, Any] | None, kind: OutcomeKind, reason: str, in_hint: str
) -> None:
    compute = CannedCompute(
        result_line("detect", "AVMA", 1, attestation),
        result_line("remediate", "KMS_CLIENT", 1, attestation, steps=ALL_OK),
    )
    settings = Settings.from_env({}).with_mode(Mode.ENFORCE)
    outcome = await Remediator(compute, settings).check(VmId.parse(vm_id("azure-edition")))
    assert (outcome.kind, outcome.reason) == (kind, reason)
    assert in_hint in outcome.hint
    assert outcome.details["edition"] == "Windows Server 2022 Datacenter: Azure Edition"
    assert len(compute.bodies) == 2


async def test_a_partial_remediation_says_the_vm_is_now_a_kms_client() -> None:
    attested = {"imdsReachable": True, "chainValid": True, "error": None}
    steps = [
        {"name": "install-key", "hresult": "0x00000000"},
        {"name": "clear-kms-cache", "hresult": "0x80070005"},
    ]
    compute = CannedCompute(
        result_line("detect", "AVMA", 5, attested),
        result_line("remediate", "KMS_CLIENT", 5, attested, steps=steps),
    )
    settings = Settings.from_env({}).with_mode(Mode.ENFORCE)
    outcome = await Remediator(compute, settings).check(VmId.parse(vm_id("partial")))
    assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "step-error:clear-kms-cache:0x80070005")
    assert (outcome.details["channel"], outcome.details["channelAfter"]) == ("AVMA", "KMS_CLIENT")
    assert "now a KMS client" in outcome.hint and "keeps its previous channel" not in outcome.hint


# --- answers that say nothing about the VM: deferred, and bounded (shared/unreadable.py) ---------


def _one_vm(monkeypatch: pytest.MonkeyPatch, faults: dict[str, Any], *names: str) -> Simulator:
    estate = Estate.from_dict(
        {"vms": [windows(name) for name in names or ("avma-dc",)], "faults": {"seed": 1, **faults}}
    )
    started = Simulator(estate, latency_s=0.02).start()
    for key, value in started.env().items():
        monkeypatch.setenv(key, value)
    return started


async def test_an_operation_that_ends_failed_is_deferred_and_a_refused_request_still_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Run Command was accepted and its operation ended Failed (InternalExecutionError): nothing
    was learnt about the VM, so it is retried; a request ARM refused (400) is no passing fault."""
    # On the two-step path (a VM whose edition ARM does not name): the first Run Command is the
    # detection; the one-step path's unreadable re-key is below.
    monkeypatch.setattr("shared.workflow.expectation_for", lambda vm, settings: None)
    failing = _one_vm(monkeypatch, {"operationFailed": {"every": 1}})
    try:
        settings = Settings.from_env(failing.env()).with_mode(Mode.ENFORCE)
        async with make_credential(settings) as credential, ComputeGateway(credential, settings) as gateway:
            outcome = await Remediator(gateway, settings).check(VmId.parse(vm_id("avma-dc")))
            refused = await gateway.run_command(
                VmId.parse(vm_id("avma-dc")), {"commandId": "RunPowerShellScript", "script": "not a list"}
            )
    except Exception as error:  # the 400 is raised, as the workflow's except clause sees it
        refused_error = error
    else:
        raise AssertionError(f"a Run Command without a script was accepted: {refused}")
    finally:
        failing.stop()
    assert (outcome.kind, outcome.reason) == (OutcomeKind.DEFERRED, "run-command-failed"), outcome
    assert (outcome.details["phase"], outcome.details["code"]) == ("detect", "InternalExecutionError")
    assert "retried" in outcome.hint
    from shared.azure.compute import RunCommandFailed, RunCommandOperationFailed

    assert isinstance(refused_error, RunCommandFailed) and not isinstance(
        refused_error, RunCommandOperationFailed
    )
    assert refused_error.status == 400


async def test_unreadable_detection_output_is_deferred_with_the_error(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shared.workflow.expectation_for", lambda vm, settings: None)  # two-step path
    remediator, gateway = engine()
    real_run = gateway.run_command

    async def cut(vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        out, _ = await real_run(vm, body)
        return out[: out.index("AVMA-REMEDIATOR-RESULT") + 60], "a transcript line"  # the line cut short

    gateway.run_command = cut  # type: ignore[method-assign]
    outcome = await remediator.check(VmId.parse(vm_id("avma-dc")))
    assert (outcome.kind, outcome.reason, outcome.details["phase"]) == (
        OutcomeKind.DEFERRED,
        "bad-output",
        "detect",
    )
    assert outcome.details["error"] and outcome.details["stderr"] == "a transcript line"
    assert "retried" in outcome.hint
    assert [e["script"] for e in sim.run_log(vm_id("avma-dc"))] == ["detect"]  # nothing was acted on


async def test_an_unreadable_remediation_answer_is_retried_by_detecting_first_never_re_keying_blindly(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remediation POST was accepted and ran, but its answer cannot be read: what it did is not
    known. The CLI's sweep tries again within the run, and the retry detects the VM's new state (now
    Licensed on the KMS channel: healthy) instead of sending the remediation again. On the two-step
    path (the one-step path's conditional re-key: the next test)."""
    monkeypatch.setattr("shared.workflow.expectation_for", lambda vm, settings: None)
    remediator, gateway = engine()
    real_run = gateway.run_command

    async def cut_remediation_output(vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        out, err = await real_run(vm, body)
        remediation = any("guest script: remediate" in line for line in body.get("script", []))
        return (out[:40], err) if remediation else (out, err)

    gateway.run_command = cut_remediation_output  # type: ignore[method-assign]
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    from shared.unreadable import check_until_readable

    outcome = await check_until_readable(
        lambda: remediator.check(VmId.parse(vm_id("avma-dc"))), backoff_s=0.5, sleep=no_wait
    )
    assert (outcome.kind, outcome.reason) == (OutcomeKind.HEALTHY, "kms-client-licensed")
    assert waits == [0.5]
    [earlier] = outcome.details["earlierTries"]  # the operator still sees that a remediation ran
    assert (earlier["reason"], earlier["phase"]) == ("bad-output", "remediate")
    assert state(sim, "avma-dc")["channel"] == "KMS_CLIENT"
    scripts = [e["script"] for e in sim.run_log(vm_id("avma-dc"))]
    assert scripts == ["detect", "remediate", "detect"], scripts  # detected again, never re-keyed twice


class Unreadable:
    """A checker whose first ``bad`` answers say nothing about the VM, then a readable one."""

    def __init__(self, bad: int, reason: str = "run-command-failed") -> None:
        self.bad, self.reason, self.calls = bad, reason, 0
        self.hooks: list[Any] = []  # the before-Run-Command hook each call was given

    async def check(self, vm: VmId, *, listed: VmFacts | None = None, before_run_command: Any = None) -> Any:
        from shared.model import Outcome

        self.calls += 1
        self.hooks.append(before_run_command)
        if self.calls <= self.bad:
            details = {"phase": "detect", "code": "InternalExecutionError", "error": "internal"}
            return Outcome(str(vm), OutcomeKind.DEFERRED, self.reason, "retried", details)
        return Outcome(str(vm), OutcomeKind.HEALTHY, "kms-client-licensed")


async def _listing(sub: str) -> Any:
    yield VmFacts(VmId.parse(vm_id("one")), "Windows", "running", None, {})


@pytest.mark.parametrize("reason", ["run-command-failed", "bad-output"])
async def test_the_cli_sweep_retries_an_unreadable_answer_three_times_then_reports_it_failed(
    reason: str,
) -> None:
    from shared.unreadable import check_until_readable

    thrice = Unreadable(3, reason)
    [passed] = (await sweep(thrice, _listing, [SUB], concurrency=1, unreadable_backoff_s=0.001)).outcomes
    assert (passed.kind, passed.reason, thrice.calls) == (OutcomeKind.HEALTHY, "kms-client-licensed", 4)
    from shared.workflow import detect_first

    assert thrice.hooks == [None, detect_first, detect_first, detect_first]  # each retry detects first
    assert [t["reason"] for t in passed.details["earlierTries"]] == [reason, reason, reason]
    always = Unreadable(99, reason)
    [failed] = (await sweep(always, _listing, [SUB], concurrency=1, unreadable_backoff_s=0.001)).outcomes
    assert (failed.kind, failed.reason, always.calls) == (OutcomeKind.FAILED, reason, 4)
    assert failed.details["tries"] == 4 and len(failed.details["earlierTries"]) == 3
    assert failed.details["code"] == "InternalExecutionError" and "4 tries" in failed.hint
    # A growing backoff between tries: the first wait, then twice it.
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    vm = VmId.parse(vm_id("one"))
    await check_until_readable(lambda: Unreadable(99, reason).check(vm), backoff_s=0.25, sleep=no_wait)
    assert waits == [0.25, 0.5, 1.0]


def test_the_cli_check_tries_a_failed_operation_again_within_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` has no queue to come back later either: the same bounded retry as the sweep."""
    import shared.unreadable
    from shared.cli import main

    monkeypatch.setattr(shared.unreadable, "CLI_BACKOFF_S", 0.01)
    vm = vm_id("kms-ok")
    estate = tmp_path / "estate.json"
    healthy = windows("kms-ok", channel="KMS_CLIENT", status=1, kms_host="azkms.core.windows.net:1688")
    estate.write_text(json.dumps({"vms": [healthy], "faults": {"operationFailed": {"every": 1}}}))
    state = tmp_path / "state.json"
    argv = ["check", vm, "--simulate", str(estate), "--output", "json", "--sim-state-out", str(state)]
    assert main(argv) == 1  # still failing after the bound: a failed VM
    [out] = json.loads(capsys.readouterr().out)["vms"]
    assert (out["outcome"], out["reason"], out["tries"]) == ("failed", "run-command-failed", 4)
    assert json.loads(state.read_text())[vm]["runCommands"] == 4


# --- the merge of the one-Run-Command path (issue 12) with item 7: an unreadable re-key ----------


def _kinds(sim: Simulator, name: str) -> list[str]:
    """``detect``, ``remediate`` or ``rekey-if`` (the conditional re-key of the one-step path)."""
    return [
        "rekey-if" if e["script"] == "remediate" and "ExpectBuild" in e["parameters"] else str(e["script"])
        for e in sim.run_log(vm_id(name))
    ]


@pytest.mark.parametrize("fault", ["cut", "operation-failed"])
async def test_an_unreadable_conditional_rekey_is_retried_by_the_sweep_detecting_first(
    fault: str, engine: Engine, sim: Simulator
) -> None:
    """The first Run Command of a VM whose edition ARM names is a conditional re-key (issue 12): it
    may install the key before its answer is lost (output cut, or its operation ended Failed after
    the script ran). The sweep's in-run retry must not send it again: it detects first, sees the VM
    Licensed on the KMS channel and records healthy, the unreadable re-key in ``earlierTries``."""
    from shared.azure.compute import RunCommandOperationFailed

    remediator, gateway = engine()
    real_run = gateway.run_command

    async def lose_the_rekeys_answer(vm: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        out, err = await real_run(vm, body)  # it ran, and changed the VM when the facts matched
        if not any("guest script: remediate" in line for line in body.get("script", [])):
            return out, err
        if fault == "cut":
            return out[:40], err
        raise RunCommandOperationFailed(
            "An internal execution error occurred.", code="InternalExecutionError", status=200
        )

    gateway.run_command = lose_the_rekeys_answer  # type: ignore[method-assign]
    listed = await gateway.get_vm(VmId.parse(vm_id("avma-dc")))

    async def one(sub: str) -> Any:
        yield listed

    [outcome] = (await sweep(remediator, one, [SUB], concurrency=1, unreadable_backoff_s=0.001)).outcomes
    assert (outcome.kind, outcome.reason) == (OutcomeKind.HEALTHY, "kms-client-licensed"), outcome
    [earlier] = outcome.details["earlierTries"]
    reason = "bad-output" if fault == "cut" else "run-command-failed"
    assert (earlier["reason"], earlier["phase"]) == (reason, "remediate")
    assert _kinds(sim, "avma-dc") == ["rekey-if", "detect"]  # detected first, no second key
    assert state(sim, "avma-dc")["channel"] == "KMS_CLIENT"


async def test_check_and_apply_retry_an_unreadable_answer_detecting_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``check --ids``, ``--from`` and ``apply`` (``run_each``): as the sweep, every retry after an
    unreadable answer carries the detect-first hook."""
    import shared.unreadable
    from shared.resume import run_each
    from shared.workflow import detect_first

    monkeypatch.setattr(shared.unreadable, "CLI_BACKOFF_S", 0.001)
    twice = Unreadable(2, "bad-output")
    [outcome] = await run_each(twice, [VmId.parse(vm_id("one"))], concurrency=1)
    assert (outcome.kind, twice.calls) == (OutcomeKind.HEALTHY, 3)
    assert twice.hooks == [None, detect_first, detect_first]


async def test_the_clis_later_passes_carry_the_unreadable_count_and_detect_first() -> None:
    """A VM that gave three unreadable answers in the run and then a readable deferral (busy) is
    checked again in a later pass (shared/inrun_retry.py): its fourth unreadable answer in the run
    is terminal there too, and that pass's check detects first. Without the carried count the pass
    left it ``deferred`` for ever and sent the conditional re-key again."""
    from shared.inrun_retry import RetryPolicy, retry_deferred
    from shared.model import Outcome
    from shared.unreadable import rechecking
    from shared.workflow import detect_first

    vm = vm_id("one")
    three = [{"reason": "bad-output", "phase": "remediate"}] * 3
    busy = Outcome(vm, OutcomeKind.DEFERRED, "run-command-busy", "", {"earlierTries": three})
    healthy = Outcome(vm_id("two"), OutcomeKind.DEFERRED, "run-command-busy", "", {})
    always = Unreadable(99, "bad-output")

    async def no_wait(seconds: float) -> None:
        return None

    policy = RetryPolicy(first_wait_s=0.0, retries=3)
    settings = Settings.from_env({})
    done = [busy, healthy]
    [failed, other] = await retry_deferred(
        done, rechecking(always, done, backoff_s=0.0), policy, settings, concurrency=1, sleep=no_wait
    )
    assert (failed.kind, failed.reason, failed.details["tries"]) == (OutcomeKind.FAILED, "bad-output", 4)
    assert len(failed.details["earlierTries"]) == 3 and "4 tries" in failed.hint
    # the other VM had no unreadable answer before: its own count starts at one, its first try as usual
    assert (other.kind, other.reason) == (OutcomeKind.FAILED, "bad-output")
    assert always.hooks[0] == detect_first and always.hooks[1:] == [
        None,
        detect_first,
        detect_first,
        detect_first,
    ]
