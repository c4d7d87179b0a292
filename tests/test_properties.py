"""Property tests: hostile input never crashes the engine, never makes it act halfway, and never
puts text of its own into a guest script.

- settings: any environment gives Settings or a ConfigError, never another exception;
- whatever KMS host and port pass validation reach a VM only as Run Command parameter values: the
  script lines stay byte-identical to the shipped .ps1 files, and the product key comes only from
  the catalog (checked against the simulator's own key table, not the engine's);
- the workflow, fed any detection output a real guest could give (cut to its last bytes, garbled,
  buried in noise, or replaced by junk), ends in one outcome and remediates only a VM that the
  decision table allows, with a complete, valid body; when only detection ran, the outcome is
  exactly the table's for the true guest state (worked out from the guest's own fields), or
  ``deferred: bad-output`` (retried, never a verdict) for a mangled result line;
- the guest parser gives the same facts or a clear error for cut and garbled output;
- the queue worker records any message body it cannot read (never raises, never drops it).

Intake has its own property test (tests/test_intake.py); the parser's arbitrary-text and
arbitrary-JSON properties are in tests/test_guest_parser.py. These extend them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.catalog import CATALOG
from shared.guest.facts import Channel, GuestOutputError, GuestResult, parse_result
from shared.guest.scripts import DETECT, REMEDIATE, RunCommandInput, detect_command, remediate_command
from shared.model import Outcome, OutcomeKind, VmId, WorkItem
from shared.settings import ConfigError, Mode, Settings
from shared.vm import VmFacts
from shared.worker import Worker
from shared.workflow import Remediator
from simulator.estate import GuestSpec
from simulator.generator import CLIENT_PROFILES, MULTI_SESSION, SERVER_PROFILES, UNKNOWN_EDITION
from simulator.guest import (
    KEYS,
    KMS_HOSTS,
    PRODUCT_UNLICENSED,
    WindowsGuest,
    base_edition,
    is_azure_edition,
    key_for,
)

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "shared" / "guest"


def _shipped(name: str) -> tuple[str, ...]:
    """The files as shipped: ``<name>.ps1`` with its include line replaced by ``common.ps1``."""
    lines: list[str] = []
    for line in (GUEST / f"{name}.ps1").read_text(encoding="utf-8").splitlines():
        if line == "# @include common.ps1":
            lines += (GUEST / "common.ps1").read_text(encoding="utf-8").splitlines()
        else:
            lines.append(line)
    return tuple(lines)


SHIPPED = {name: _shipped(name) for name in ("detect", "remediate")}
CATALOG_KEYS = frozenset(entry.product_key for entry in CATALOG)
HOST_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
VM = VmId.parse(
    "/subscriptions/3f2c8a51-6b0e-4d7a-9c1e-2a5b7d9e4f10/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/app-01"
)
# Every setting Settings.from_env reads.
SETTING_NAMES = (
    "AZURE_CLOUD",
    "REMEDIATION_MODE",
    "ARM_ENDPOINT",
    "AZURE_CA_BUNDLE",
    "TARGET_SUBSCRIPTIONS",
    "OPT_OUT_TAG",
    "ALLOW_CUSTOM_KMS_OVERRIDE",
    "KMS_HOST",
    "KMS_PORT",
    "MAX_CONCURRENCY",
    "RUN_COMMAND_TIMEOUT_SECONDS",
    "POLL_INTERVAL_SECONDS",
    "AzureWebJobsStorage",
    "AzureWebJobsStorage__queueServiceUri",
    "AzureWebJobsStorage__tableServiceUri",
    "AzureWebJobsStorage__clientId",
    "LEDGER_TABLE",
    "LOG_ANALYTICS_WORKSPACE_ID",
    "LOG_ANALYTICS_ENDPOINT",
    "MANAGEMENT_GROUP_ID",
    "LOG_SCAN_LOOKBACK_MINUTES",
    "LOG_SCAN_OVERLAP_MINUTES",
    "RECHECK_AFTER_HOURS",
    "DEFER_DELAY_SECONDS",
    "DEFER_DEADLINE_HOURS",
)
TRICKY = (
    "",
    " ",
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e309",
    "-0",
    "0x10",
    "1_000",
    "\u0661\u0666\u0668\u0668",  # Arabic-Indic digits: int() reads them as 1688
    " enforce ",
    "ENFORCE",
    "AzureUSGovernment",
    "true",
    "yes",
    "2",
    "65536",
    "1688",
    "azkms.core.windows.net",
    "KMS.Core.Windows.Net",
    "a..b",
    "-host",
    "host-",
    "x" * 300,
    "$(Invoke-Expression 'whoami')",
    "azkms.core.windows.net; Remove-Item C:\\ -Recurse",
    "azkms.core.windows.net`nWrite-Host pwned",
    "'; exit; '",
    "\u202eten.swodniw.eroc.smkza",
    "https://127.0.0.1:1",
    "/etc/passwd",
    ".",
)
hostile_text = (
    st.sampled_from(TRICKY)
    | st.text(max_size=40)
    | st.from_regex(r"-?[0-9]{1,7}(\.[0-9]{1,3})?", fullmatch=True)
)
valid_hosts = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,4}", fullmatch=True
)
environments = st.dictionaries(
    st.sampled_from(SETTING_NAMES) | st.text(max_size=12), hostile_text, max_size=10
)


# --- settings ----------------------------------------------------------------------------------


@settings(max_examples=400)
@given(environments)
def test_any_environment_gives_settings_or_a_config_error(env: dict[str, str]) -> None:
    try:
        loaded = Settings.from_env(env)
    except ConfigError as error:
        problems = error.problems
        assert problems
        assert all(isinstance(problem, str) and problem for problem in problems)
        return
    # What a valid configuration guarantees to everything downstream.
    assert loaded.mode in (Mode.AUDIT, Mode.ENFORCE)
    assert HOST_NAME.fullmatch(loaded.kms_host) and len(loaded.kms_host) <= 253
    assert 1 <= loaded.kms_port <= 65535
    assert loaded.arm_endpoint.startswith("https://")
    assert 0 < loaded.run_command_timeout_s <= 5400
    assert loaded.defer_delay_s >= 0 and loaded.defer_deadline_s >= 0


def test_anything_but_enforce_is_audit() -> None:
    for word in ("", "Audit", " audit"):
        assert Settings.from_env({"REMEDIATION_MODE": word}).mode is Mode.AUDIT
    with pytest.raises(ConfigError):
        Settings.from_env({"REMEDIATION_MODE": "enforced"})


def _assert_only_parameters(body: RunCommandInput, script: str, settings_: Settings) -> dict[str, str]:
    """The body runs the shipped script unchanged; the settings reach it only as parameter values."""
    assert body["commandId"] == "RunPowerShellScript"
    assert tuple(body["script"]) == SHIPPED[script]
    params = {p["name"]: p["value"] for p in body["parameters"]}
    assert len(params) == len(body["parameters"])  # no name twice
    assert set(params) <= {"KmsHost", "KmsPort", "ProductKey", "InstallKey"}
    assert params["KmsHost"] == settings_.kms_host
    assert params["KmsPort"] == str(settings_.kms_port)
    return params


@settings(max_examples=300)
@given(
    host=valid_hosts | hostile_text,
    port=st.integers(-2, 70000).map(str) | hostile_text,
    other=environments,
    key=st.sampled_from(sorted(CATALOG_KEYS)),
)
def test_a_kms_setting_that_passes_validation_reaches_a_vm_only_as_a_parameter(
    host: str, port: str, other: dict[str, str], key: str
) -> None:
    env = {**other, "KMS_HOST": host, "KMS_PORT": port}
    try:
        loaded = Settings.from_env(env)
    except ConfigError:
        return
    _assert_only_parameters(detect_command(loaded.kms_host, loaded.kms_port), "detect", loaded)
    repair = _assert_only_parameters(
        remediate_command(product_key=None, kms_host=loaded.kms_host, kms_port=loaded.kms_port),
        "remediate",
        loaded,
    )
    assert repair["InstallKey"] == "0" and "ProductKey" not in repair
    rekey = _assert_only_parameters(
        remediate_command(product_key=key, kms_host=loaded.kms_host, kms_port=loaded.kms_port),
        "remediate",
        loaded,
    )
    assert (rekey["InstallKey"], rekey["ProductKey"]) == ("1", key)


anything = st.one_of(
    st.text(max_size=60), st.integers(), st.floats(), st.booleans(), st.none(), st.binary(max_size=20)
)


@settings(max_examples=300)
@given(host=anything | valid_hosts, port=anything | st.integers(0, 70000), key=anything)
def test_command_builders_take_any_value_and_give_a_value_error_or_the_shipped_script(
    host: Any, port: Any, key: Any
) -> None:
    builders: dict[str, Callable[[], RunCommandInput]] = {
        "detect": lambda: detect_command(host, port),
        "remediate": lambda: remediate_command(product_key=key, kms_host=host, kms_port=port),
    }
    for script, build in builders.items():
        try:
            body = build()
        except ValueError:
            continue
        assert tuple(body["script"]) == SHIPPED[script]
        params = {p["name"]: p["value"] for p in body["parameters"]}
        assert params["KmsHost"] == host and HOST_NAME.fullmatch(host)
        assert params["KmsPort"] == str(port) and not isinstance(port, bool)
        if script == "remediate":  # None means "repair": no key, InstallKey 0
            assert params.get("ProductKey") == key
            assert params["InstallKey"] == ("0" if key is None else "1")


def test_the_loaded_scripts_are_the_shipped_files() -> None:
    assert DETECT.lines == SHIPPED["detect"]
    assert REMEDIATE.lines == SHIPPED["remediate"]


# --- guests: realistic state, then what Run Command may do to its output -----------------------

PROFILES = (*SERVER_PROFILES, *CLIENT_PROFILES, MULTI_SESSION, UNKNOWN_EDITION)
KMS_TARGETS = (None, "azkms.core.windows.net:1688", "kms.core.windows.net:1688", "kms.contoso.local:1688")


@st.composite
def guests(draw: st.DrawFn) -> WindowsGuest:
    caption, build, product_type, edition, sku = draw(st.sampled_from(PROFILES))
    target = draw(st.sampled_from(KMS_TARGETS))
    host, _, port = (target or "").partition(":")
    spec = GuestSpec(
        caption=caption,
        build=build,
        product_type=product_type,
        edition_id=edition,
        sku=sku,
        channel=draw(st.sampled_from(["AVMA", "AVMA", "KMS_CLIENT", "KMS_CLIENT", "RETAIL", "MAK", "OEM"])),
        license_status=draw(st.integers(0, 6)),
        kms_host=host or None,
        kms_port=int(port) if port else 0,
        kms_reachable=draw(st.booleans()),
    )
    return WindowsGuest.from_spec(spec, cloud="AzureCloud", seed=VM.name)


def _garble(text: str, positions: list[float]) -> str:
    data = bytearray(text.encode("utf-8"))
    for at in positions:
        if data:
            data[int(at * len(data))] = 0xFF
    return data.decode("utf-8", errors="replace")


@st.composite
def mangling(draw: st.DrawFn) -> tuple[str, Any]:
    """What may happen to an output between the guest and the engine (and junk instead)."""
    kind = draw(st.sampled_from(["none", "cut", "garble", "noise", "junk"]))
    if kind == "cut":
        return kind, draw(st.integers(0, 4096))
    if kind == "garble":
        return kind, draw(st.lists(st.floats(0, 0.999), min_size=1, max_size=8))
    if kind == "noise":
        return kind, (draw(st.text(max_size=200)), draw(st.text(max_size=200)))
    if kind == "junk":
        return kind, draw(st.text(max_size=300))
    return kind, None


def _mangle(output: str, how: tuple[str, Any]) -> str:
    kind, arg = how
    if kind == "cut":
        return output.encode("utf-8")[-arg:].decode("utf-8", errors="ignore") if arg else ""
    if kind == "garble":
        return _garble(output, arg)
    if kind == "noise":
        # Noise lines never start with the marker (a forged result line is the guest lying, out of scope).
        before, after = (text.replace("AVMA-REMEDIATOR-RESULT", "") for text in arg)
        return f"{before}\n{output}\n{after}"
    if kind == "junk":
        return str(arg)
    return output


def _params(body: Mapping[str, Any]) -> list[dict[str, str]]:
    return [dict(p) for p in body["parameters"]]


class GuestCompute:
    """ARM as the workflow sees it, in front of a simulated guest whose outputs get mangled."""

    def __init__(self, guest: WindowsGuest, detect: tuple[str, Any], remediate: tuple[str, Any]) -> None:
        self.guest = guest
        self.manglings = [detect, remediate]
        self.bodies: list[Mapping[str, Any]] = []
        self.outputs: list[str] = []  # what the engine was given

    async def get_vm(self, vm_id: VmId) -> VmFacts:
        return VmFacts(vm_id, "Windows", "running", True, {})

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        self.bodies.append(body)
        output = self.guest.run_script(body["script"], _params(body))
        self.outputs.append(_mangle(output, self.manglings[min(len(self.bodies), 2) - 1]))
        return self.outputs[-1], ""


def _allowed(guest: WindowsGuest) -> str | None:
    """The decision table's remediation rows, from the safety rules alone, on the true guest state."""
    if guest.edition_id.lower() == "serverrdsh" or guest.sku == 175:
        return None
    if guest.channel == "AVMA":
        return "rekey"
    if guest.channel == "KMS_CLIENT" and guest.license_status != 1:
        host = guest.kms_machine
        if host is None or host.lower() in KMS_HOSTS["AzureCloud"]:
            return "repair"
    return None


def _table(guest: WindowsGuest, enforce: bool) -> tuple[str, str]:
    """What the decision table (docs/decision-table.md) gives for this true guest state, worked out
    from the guest's own fields and the simulator's key table, never from the engine's report.

    ``("remediate", action)`` when the table runs a remediation; otherwise the outcome's kind and
    reason. Settings are the defaults: the Azure KMS, no custom-KMS override.
    """
    if guest.ps_version in ("1.0", "2.0"):
        return "failed", "powershell-version"
    if guest.edition_id.lower() == "serverrdsh" or guest.sku == 175:
        return "skipped", "multi-session"
    licensed = guest.license_status == 1
    if guest.channel == "AVMA":
        if guest.build < 9600:
            return "skipped", "avma-before-2012r2"
        if key_for("KMS_CLIENT", guest.edition_id, guest.build) is None or guest.sku == PRODUCT_UNLICENSED:
            # No published GVLK fits, or OperatingSystemSKU contradicts the EditionID: never guessed.
            return "skipped", "unknown-edition"
        if not guest.kms_reachable and licensed:
            return (
                ("deferred", "kms-unreachable")
                if enforce
                else ("would-remediate", "avma-licensed-kms-unreachable")
            )
        if enforce:
            return "remediate", "rekey"
        return "would-remediate", "avma-channel" if guest.kms_reachable else "avma-kms-unreachable"
    if guest.channel == "KMS_CLIENT":
        if licensed:
            if is_azure_edition(guest.edition_id):
                if not guest.imds_reachable:
                    return "failed", "attestation-imds-unreachable"
                if not guest.imds_chain_valid:
                    return "failed", "attestation-chain-invalid"
            return "healthy", "kms-client-licensed"
        hosts = (guest.kms_machine, guest.discovered_machine)
        if any(host and host.lower() not in KMS_HOSTS["AzureCloud"] for host in hosts):
            return "skipped", "custom-kms"
        return ("remediate", "repair") if enforce else ("would-remediate", "kms-client-unlicensed")
    channel = guest.channel.lower()
    return ("healthy", f"{channel}-licensed") if licensed else ("skipped", f"channel-{channel}")


# What a spoiled text field in an otherwise valid result line can make of a verdict: the engine no
# longer knows the channel, the edition or the KMS host, and leaves the VM alone.
SPOILED_TEXT = {
    ("skipped", "unknown-channel"),
    ("skipped", "unknown-edition"),
    ("skipped", "custom-kms"),
}


def _result_line(output: str) -> str:
    return next(line for line in output.split("\n") if line.startswith("AVMA-REMEDIATOR-RESULT "))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(guest=guests(), detect=mangling(), remediate=mangling(), enforce=st.booleans())
def test_any_detection_output_gives_one_outcome_and_only_an_allowed_complete_remediation(
    guest: WindowsGuest, detect: tuple[str, Any], remediate: tuple[str, Any], enforce: bool
) -> None:
    loaded = Settings.from_env({"REMEDIATION_MODE": "enforce" if enforce else "audit"})
    truth = replace(guest)  # the state before anything ran
    expected = _table(truth, enforce)
    line = _result_line(
        replace(guest).run_script(DETECT.lines, _params(detect_command(loaded.kms_host, loaded.kms_port)))
    )
    compute = GuestCompute(guest, detect, remediate)
    outcome = asyncio.run(Remediator(compute, loaded).check(VM))

    event(f"{detect[0]} detection output: {outcome.kind.value}")
    assert isinstance(outcome, Outcome) and outcome.kind in OutcomeKind
    if outcome.kind is OutcomeKind.DEFERRED and outcome.reason == "bad-output":
        # Output with no readable result line says nothing about the VM: retried (the retry detects
        # first), never a verdict, and it names the script whose answer it was.
        assert outcome.details["phase"] == ("detect", "remediate")[len(compute.bodies) - 1], outcome
    elif outcome.kind is OutcomeKind.DEFERRED:
        # The other deferral a guest can cause (nothing else here is transient): a Licensed AVMA VM
        # whose KMS is unreachable is never re-keyed, so it waits with nothing changed.
        assert outcome.reason == "kms-unreachable", outcome
        assert truth.channel == "AVMA" and truth.license_status == 1 and not truth.kms_reachable
        assert len(compute.bodies) == 1 and guest.licensing() == truth.licensing()
    assert 1 <= len(compute.bodies) <= 2
    _assert_only_parameters(compute.bodies[0], "detect", loaded)  # type: ignore[arg-type]
    if len(compute.bodies) == 1:
        assert outcome.kind is not OutcomeKind.REMEDIATED
        assert guest.licensing() == truth.licensing()  # nothing changed
        # Only detection ran: the outcome is the table's for the true state, judged independently.
        # Output whose result line reached the engine whole must give exactly that; a mangled line
        # is deferred as bad-output (retried), or (a garbled text field only) leaves the VM alone for
        # want of a fact.
        got = (outcome.kind.value, outcome.reason)
        whole = line in (raw.rstrip("\r") for raw in compute.outputs[0].split("\n"))
        if whole:
            assert got == expected, f"{got} for {truth}, the table gives {expected}"
        elif detect[0] == "garble":
            assert got in {expected, ("deferred", "bad-output"), *SPOILED_TEXT}, (got, expected, truth)
        else:
            assert got == ("deferred", "bad-output"), (got, expected, truth)
        return
    assert expected[0] == "remediate", f"a remediation ran where the table gives {expected}: {truth}"
    assert enforce, "audit mode ran a remediation"
    action = _allowed(truth)
    assert action is not None, f"remediation of a VM the table leaves alone: {truth}"
    params = _assert_only_parameters(compute.bodies[1], "remediate", loaded)  # type: ignore[arg-type]
    if action == "rekey":
        key = params["ProductKey"]
        assert params["InstallKey"] == "1" and key in CATALOG_KEYS
        # The simulator's own key table says this key fits this edition and build.
        assert KEYS[key].edition == base_edition(truth.edition_id) and truth.build in KEYS[key].builds
    else:
        assert params["InstallKey"] == "0" and "ProductKey" not in params
    if outcome.kind is OutcomeKind.REMEDIATED:
        assert (guest.channel, guest.license_status) == ("KMS_CLIENT", 1)


@settings(max_examples=300)
@given(guest=guests(), cut=st.integers(0, 4200), garble=st.lists(st.floats(0, 0.999), max_size=6))
def test_a_cut_or_garbled_output_gives_the_same_facts_or_a_clear_error(
    guest: WindowsGuest, cut: int, garble: list[float]
) -> None:
    output = guest.run_script(
        DETECT.lines,
        [{"name": "KmsHost", "value": "azkms.core.windows.net"}, {"name": "KmsPort", "value": "1688"}],
    )
    full = parse_result(output, expected_script="detect")
    mangled = _garble(output.encode("utf-8")[-cut:].decode("utf-8", errors="ignore") if cut else "", garble)
    try:
        parsed = parse_result(mangled, expected_script="detect")
    except GuestOutputError:
        return
    assert isinstance(parsed, GuestResult) and full.os is not None and full.license is not None
    assert parsed.os is not None and parsed.license is not None
    # A byte that is not UTF-8 any more can only spoil text, never turn a number into another one.
    assert (parsed.os.build, parsed.os.sku, parsed.os.product_type) == (
        full.os.build,
        full.os.sku,
        full.os.product_type,
    )
    assert parsed.license.license_status == full.license.license_status
    assert parsed.license.channel in (full.license.channel, Channel.UNKNOWN)
    for field in ("edition_id", "caption"):
        value, original = getattr(parsed.os, field), getattr(full.os, field)
        assert value == original or "\ufffd" in value
    if not garble:
        assert parsed == full


# --- the queue worker: any message body --------------------------------------------------------


class Recorder:
    """Ledger, queue, resolver and workflow fakes that remember what the worker did."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.records: list[Outcome] = []
        self.sent: list[WorkItem] = []
        self.checked: list[VmId] = []
        self.resolved: list[str] = []

    async def acquire(self, vm_id: VmId, *, owner: str, now: Any = None) -> object:
        return object()

    async def release(self, lease: Any, outcome: Outcome | None) -> None:
        return None

    async def record(
        self, vm_id: VmId, *, outcome: Outcome, trigger: str, correlation_id: str, attempt: int
    ) -> None:
        self.records.append(outcome)

    async def record_event(self, target: str, **fields: Any) -> None:
        self.events.append({"target": target, **fields})

    async def send(self, item: WorkItem, *, delay_s: float = 0.0) -> None:
        self.sent.append(item)

    async def resolve_computer(self, computer: str) -> list[VmId]:
        self.resolved.append(computer)
        return [VM] if computer.lower().startswith("app") else []

    async def renew(self, lease: Any, *, intent: Any = None) -> None:
        return None

    async def record_intent(self, vm_id: VmId, **fields: Any) -> None:
        self.events.append({"target": str(vm_id), "intent": True, **fields})

    async def check(self, vm_id: VmId, **hooks: Any) -> Outcome:
        self.checked.append(vm_id)
        return Outcome(str(vm_id), OutcomeKind.HEALTHY, "kms-client-licensed")


work_items = st.fixed_dictionaries(
    {"reason": st.sampled_from(["vm-created", "alert", "log-scan", "sweep", "manual", "other"])},
    optional={
        "vmId": st.sampled_from([str(VM), str(VM).upper(), "/subscriptions/x", ""]) | st.text(max_size=20),
        "computer": st.sampled_from(["app-01", "APP-01", " ", "ghost"]) | st.text(max_size=20),
        "attempt": st.integers(-1, 5) | st.booleans() | st.text(max_size=3),
        "correlationId": st.text(max_size=20) | st.integers(),
        "firstSeen": st.sampled_from(["", "2026-01-01T00:00:00Z", "yesterday", "9999-12-31T23:59:59"]),
    },
)
bodies = st.one_of(
    st.text(max_size=200),
    work_items.map(json.dumps),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3),
        max_leaves=10,
    ).map(json.dumps),
    st.integers(1, 60_000).map(lambda depth: "[" * depth),  # deeper than the JSON decoder's recursion limit
    st.integers(1, 60_000).map(lambda depth: '{"a":' * depth),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_queue_message_is_handled_or_recorded_as_malformed_never_raised(body: str) -> None:
    fakes = Recorder()
    loaded = Settings.from_env({})
    worker = Worker(remediator=fakes, ledger=fakes, queue=fakes, resolver=fakes, settings=loaded)
    outcomes = asyncio.run(worker.handle_message(body))
    try:
        item: WorkItem | None = WorkItem.from_dict(json.loads(body))
    except (ValueError, TypeError, RecursionError):
        item = None
    if item is None:
        assert outcomes == [] and fakes.checked == [] and fakes.sent == []
        assert [e["reason"] for e in fakes.events] == ["malformed-message"]
        assert fakes.events[0]["details"]["body"] == body[:500]
        return
    assert [e["reason"] for e in fakes.events if e["reason"] == "malformed-message"] == []
    if item.vm_id is not None:
        assert fakes.checked == [item.vm_id] and len(fakes.records) == 1
    else:
        # a name: resolved, then re-enqueued by VM id, or recorded as not found
        assert fakes.resolved == [item.computer]
        assert len(fakes.sent) + len(fakes.events) == 1
