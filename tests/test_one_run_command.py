"""Issue 12, item 2: one Run Command per fixed AVMA VM in the common case.

Where ARM's ``osName``/``osVersion`` name one catalog edition, the first Run Command is the
remediation script as a conditional re-key (docs/guest-contract.md, "Conditional re-key"): it re-keys
exactly when the guest shows the facts the decision table re-keys on, else changes nothing and the
normal two-step path follows. Audit mode never sends a key. The simulator's guest runs the same
contract; the decision stays Python's (``shared.decide``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from azure.functions.queue import QueueMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.azure.compute import ComputeGateway
from shared.azure.credentials import make_credential
from shared.catalog import AVMA_MIN_BUILD, CATALOG, entry_for_arm_os
from shared.decide import Action, decide, key_channel_contradicts
from shared.guessed_rekey import (
    REFUSED_KEY_CHANNELS,
    Expectation,
    expectation_for,
    key_channel_accepted,
)
from shared.guest.facts import RESULT_MARKER, Channel, GuestOutputError, parse_result
from shared.guest.scripts import conditional_rekey_command, detect_command
from shared.model import OutcomeKind, VmId
from shared.settings import Mode, Settings
from shared.vm import VmFacts
from shared.workflow import Remediator
from simulator import Estate, Simulator
from simulator.guest import DESCRIPTIONS, WindowsGuest, nt_version, unmet_preconditions
from tests.estates import windows_vm
from tests.test_guest_scripts import FILLERS, _worst_document, ps51_json, script_cost, short_text

SUB = "1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5"
KMS_HOST, KMS_PORT = "azkms.core.windows.net", 1688


def vm_id(name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/rg-one/providers/Microsoft.Compute/virtualMachines/{name}"


ESTATE = [
    windows_vm(vm_id("avma-dc")),  # Windows Server 2022 Datacenter on AVMA, as ARM names it
    windows_vm(vm_id("kms-ok"), channel="KMS_CLIENT"),
    # ARM says Datacenter (the caption the agent reports) but the guest is Standard: a wrong guess
    windows_vm(vm_id("avma-std-named-dc"), edition="ServerStandard", sku=7),
    windows_vm(vm_id("avma-nokms"), reachable=False, status=1),  # still licensed by AVMA
]


def is_conditional(entry: Mapping[str, Any]) -> bool:
    return entry["script"] == "remediate" and "ExpectBuild" in entry["parameters"]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict({"vms": ESTATE}), latency_s=0.02) as running:
        yield running


@pytest.fixture
async def engine(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Remediators wired as the CLI wires them (env → Settings → credential → gateway)."""
    for key, value in sim.env().items():
        monkeypatch.setenv(key, value)
    opened: list[Any] = []

    def build(mode: Mode = Mode.ENFORCE) -> Remediator:
        settings_ = Settings.from_env(os.environ).with_mode(mode)
        credential = make_credential(settings_)
        gateway = ComputeGateway(credential, settings_)
        opened.extend([gateway, credential])
        return Remediator(gateway, settings_)

    yield build
    for closable in opened:
        await closable.close()


def state(sim: Simulator, name: str) -> dict[str, Any]:
    return next(v for k, v in sim.state_dump().items() if k.lower() == vm_id(name).lower())


# --- the catalog by ARM's OS name ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("os_name", "os_version", "edition"),
    [
        # the REST example's pair (VirtualMachine_Get_InstanceView.json)
        (
            "Windows Server 2016 Datacenter",
            "Microsoft Windows NT 10.0.14393.0",
            "Windows Server 2016 Datacenter",
        ),
        (
            "Windows Server 2012 R2 Standard",
            "Microsoft Windows NT 6.3.9600.0",
            "Windows Server 2012 R2 Standard",
        ),
        (
            "Windows Server 2022 Datacenter: Azure Edition",
            "Microsoft Windows NT 10.0.20348.0",
            "Windows Server 2022 Datacenter: Azure Edition",
        ),
        (
            "Windows Server 2025 Datacenter Azure Edition",
            "10.0.26100.2314",
            "Windows Server 2025 Datacenter: Azure Edition",
        ),
        (
            "Microsoft Windows Server 2019 Essentials",
            "Microsoft Windows NT 10.0.17763.0",
            "Windows Server 2019 Essentials",
        ),
        ("Windows Server 2022 Datacenter", "Microsoft Windows NT 10.0.17763.0", None),  # build of 2019
        ("Windows Server 2019 Datacenter Evaluation", "Microsoft Windows NT 10.0.17763.0", None),
        ("Windows 11 Enterprise multi-session", "Microsoft Windows NT 10.0.22631.0", None),
        ("Windows 10 Enterprise", "Microsoft Windows NT 10.0.19045.0", None),  # a client: not a server row
        ("ubuntu", "22.04", None),
        ("", "", None),
    ],
)
def test_arm_os_names_name_one_catalog_row_or_none(
    os_name: str, os_version: str, edition: str | None
) -> None:
    entry = entry_for_arm_os(os_name, os_version)
    assert (entry.edition if entry else None) == edition


def arm_facts(os_name: str, os_version: str) -> VmFacts:
    return VmFacts(VmId.parse(vm_id("x")), "Windows", "running", True, os_name=os_name, os_version=os_version)


def test_a_conditional_rekey_is_offered_in_enforce_mode_only_and_for_avma_editions_only() -> None:
    enforce = Settings.from_env({"REMEDIATION_MODE": "enforce"})
    audit = Settings.from_env({})
    dc = arm_facts("Windows Server 2022 Datacenter", "Microsoft Windows NT 10.0.20348.0")
    expectation = expectation_for(dc, enforce)
    assert expectation is not None
    assert expectation.entry.edition == "Windows Server 2022 Datacenter"
    assert (expectation.build, expectation.edition_ids, expectation.skus) == (
        20348,
        ("ServerDatacenter", "ServerDatacenterCor"),
        (8, 12, 147),
    )
    assert expectation_for(dc, audit) is None  # an audit never sends a key
    # 2012 and 2008 R2 rows are repair-only (AVMA starts at 2012 R2): the table never re-keys them
    old = arm_facts("Windows Server 2012 Datacenter", "Microsoft Windows NT 6.2.9200.0")
    assert entry_for_arm_os(old.os_name, old.os_version) is not None
    assert expectation_for(old, enforce) is None
    assert expectation_for(arm_facts("", ""), enforce) is None  # an agent that reports no OS


def test_every_server_row_arm_can_name_is_checked_against_the_decision_table() -> None:
    enforce = Settings.from_env({"REMEDIATION_MODE": "enforce"})
    offered = set()
    for entry in CATALOG:
        if entry.product_type != "server":
            continue
        build = next(iter(entry.builds))
        major = "6.3" if build == 9600 else "6.2" if build == 9200 else "6.1" if build < 9200 else "10.0"
        expectation = expectation_for(
            arm_facts(entry.edition, f"Microsoft Windows NT {major}.{build}.0"), enforce
        )
        if expectation is not None:
            offered.add(entry.edition)
            assert expectation.entry == entry
        else:
            assert build < AVMA_MIN_BUILD, entry.edition  # only rows the table never re-keys
    # Standard and Datacenter of 2012 R2 to 2025, Essentials of 2012 R2 to 2019, Azure Edition of 2022, 2025
    assert len(offered) == 15


@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
    | st.sampled_from(
        [
            "Retail",
            "retail",
            "RETAIL ",
            " Volume:MAK",
            "volume:csvlk",
            "OEM:DM",
            "oem:nonslp",
            "Volume:GVLK",
            "Volume:AVMA",
            "",
            "Ｒetail",
            "Volume:MA\u212a",
            "\x1fRetail",
            "RetailX",
        ]
    )
)
def test_the_scripts_key_channel_rule_never_accepts_what_the_table_calls_another_channel(value: str) -> None:
    accepted = key_channel_accepted(value)
    if accepted:
        assert not key_channel_contradicts(Channel.AVMA, value), value
    # the simulator's guest applies the same rule as remediate.ps1 and as this Python copy of it
    facts = {
        "error": None,
        "os": {"editionId": "ServerDatacenter", "sku": 8, "build": 20348, "productType": 3},
        "license": {"description": DESCRIPTIONS["AVMA"], "productKeyChannel": value},
        "kmsProbe": {"reachable": True},
    }
    assert ("productKeyChannel" not in unmet_preconditions(facts, params(dc_expectation()))) == accepted


def test_the_refused_prefixes_are_the_tables_other_channels() -> None:
    for value in ("Retail", "Volume:MAK", "Volume:CSVLK", "OEM:DM", "OEM:SLP", "OEM:NONSLP"):
        assert key_channel_contradicts(Channel.AVMA, value)
        assert not key_channel_accepted(value, REFUSED_KEY_CHANNELS)
    for value in (None, "", "Volume:GVLK", "Volume:AVMA"):
        assert key_channel_accepted(value)


# --- the simulator's guest against the decision table -------------------------------------------


def dc_expectation() -> Expectation:
    enforce = Settings.from_env({"REMEDIATION_MODE": "enforce"})
    found = expectation_for(
        arm_facts("Windows Server 2022 Datacenter", "Microsoft Windows NT 10.0.20348.0"), enforce
    )
    assert found is not None
    return found


def body(expectation: Expectation) -> dict[str, Any]:
    return dict(
        conditional_rekey_command(
            product_key=expectation.entry.product_key,
            kms_host=KMS_HOST,
            kms_port=KMS_PORT,
            channel_token=expectation.channel_token,
            edition_ids=expectation.edition_ids,
            skus=expectation.skus,
            build=expectation.build,
            product_types=expectation.product_types,
            refused_key_channels=expectation.refused_key_channels,
        )
    )


def params(expectation: Expectation) -> dict[str, str]:
    return {p["name"].lower(): p["value"] for p in body(expectation)["parameters"]}


SERVER_ROWS = [e for e in CATALOG if e.product_type == "server" and next(iter(e.builds)) >= AVMA_MIN_BUILD]
EDITION_IDS = sorted(
    {i for e in SERVER_ROWS for i in e.edition_ids}
    | {"ServerRdsh", "serverdatacenter", "ServerDatacenterEval"}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row=st.sampled_from(SERVER_ROWS),
    edition_id=st.sampled_from(EDITION_IDS),
    sku=st.sampled_from([7, 8, 12, 13, 50, 147, 148, 175, 407, 408, 409]),
    build=st.sampled_from([9600, 14393, 17763, 20348, 26100]),
    product_type=st.sampled_from([1, 2, 3]),
    channel=st.sampled_from(["AVMA", "KMS_CLIENT", "MAK", "RETAIL", "OEM"]),
    status=st.integers(0, 6),
    reachable=st.booleans(),
)
def test_the_conditional_rekey_acts_exactly_when_the_facts_are_ones_the_table_rekeys_on(
    row: Any,
    edition_id: str,
    sku: int,
    build: int,
    product_type: int,
    channel: str,
    status: int,
    reachable: bool,
) -> None:
    enforce = Settings.from_env({"REMEDIATION_MODE": "enforce", "KMS_HOST": KMS_HOST})
    row_build = next(iter(row.builds))
    expectation = expectation_for(arm_facts(row.edition, f"Microsoft Windows NT 10.0.{row_build}.0"), enforce)
    if row_build == 9600:
        expectation = expectation_for(
            arm_facts(row.edition, f"Microsoft Windows NT 6.3.{row_build}.0"), enforce
        )
    assert expectation is not None

    def guest() -> WindowsGuest:
        return WindowsGuest(
            caption="Microsoft Windows Server",
            build=build,
            product_type=product_type,
            edition_id=edition_id,
            sku=sku,
            channel=channel,
            license_status=status,
            partial_product_key="ABCDE",
            grace_minutes=0,
            kms_machine=None,
            kms_port=0,
            discovered_machine=None,
            discovered_port=0,
            kms_reachable=reachable,
        )

    detected = parse_result(
        guest().run_script(
            detect_command(KMS_HOST, KMS_PORT)["script"], detect_command(KMS_HOST, KMS_PORT)["parameters"]
        ),
        expected_script="detect",
    )
    decision = decide(detected, enforce)
    rekeys_this_row = (
        decision.action is Action.REKEY and decision.reason == "avma-channel" and decision.entry == row
    )

    target = guest()
    before = target.licensing()
    command = body(expectation)
    result = parse_result(
        target.run_script(command["script"], command["parameters"]), expected_script="remediate"
    )
    assert result.preconditions is not None
    acted = result.preconditions.met
    if acted:
        # it re-keyed only on facts the table re-keys on, with this very row's key
        assert rekeys_this_row, (edition_id, sku, build, product_type, channel, status, reachable)
        assert result.steps[0].name == "install-key"
    else:
        assert target.licensing() == before  # nothing changed
        assert result.steps == ()
        assert (
            result.os == detected.os and result.license == detected.license
        )  # the facts, as detection reads them
    # and where the table re-keys with this row on the exact facts the command names, it acts
    exact = edition_id in row.edition_ids and reachable
    if rekeys_this_row and exact:
        assert acted


# --- the workflow against the simulator ---------------------------------------------------------


async def test_an_avma_vm_whose_edition_arm_names_is_rekeyed_by_its_first_and_only_run_command(
    engine: Any, sim: Simulator
) -> None:
    calls: list[tuple[str, str]] = []
    remediator = engine()

    async def hook(phase: str, details: Mapping[str, Any]) -> None:
        calls.append(("hook", phase))
        assert details["conditional"] is True and details["reason"] == "avma-channel"

    outcome = await remediator.check(VmId.parse(vm_id("avma-dc")), before_run_command=hook)
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "avma-channel")
    assert outcome.details["conditionalRekey"] == {"edition": "Windows Server 2022 Datacenter", "met": True}
    assert (outcome.details["channel"], outcome.details["channelAfter"]) == ("AVMA", "KMS_CLIENT")
    [run] = sim.run_log(vm_id("avma-dc"))
    assert is_conditional(run) and run["parameters"]["ProductKey"] == "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"
    assert calls == [("hook", "remediate")]  # the intent went on record before the POST
    after = state(sim, "avma-dc")
    assert (after["channel"], after["licenseStatus"], after["runCommands"]) == ("KMS_CLIENT", 1, 1)
    assert sim.run_commands_per_fixed_vm() == 1.0


async def test_a_mismatch_changes_nothing_and_the_normal_two_step_path_follows(
    engine: Any, sim: Simulator
) -> None:
    outcome = await engine().check(VmId.parse(vm_id("avma-std-named-dc")))
    first, second = sim.run_log(vm_id("avma-std-named-dc"))
    # ARM guessed Datacenter; the guest is Standard: the first command re-read and changed nothing
    assert is_conditional(first) and first["parameters"]["ProductKey"] == "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"
    assert first["before"] == first["after"] and first["before"]["channel"] == "AVMA"
    # then Python decided on the facts it reported, as on a detection: Standard's key
    assert (
        not is_conditional(second) and second["parameters"]["ProductKey"] == "VDYBN-27WPP-V4HQT-9VMD4-VMK7H"
    )
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "avma-channel")
    assert outcome.details["edition"] == "Windows Server 2022 Standard"
    assert outcome.details["conditionalRekey"] == {
        "edition": "Windows Server 2022 Datacenter",
        "met": False,
        "failed": ["editionId", "sku"],
    }
    after = state(sim, "avma-std-named-dc")
    assert (after["channel"], after["licenseStatus"], after["runCommands"]) == ("KMS_CLIENT", 1, 2)


async def test_a_healthy_vm_and_a_licensed_avma_vm_without_its_kms_take_one_run_command_and_keep_their_state(
    engine: Any, sim: Simulator
) -> None:
    remediator = engine()
    healthy = await remediator.check(VmId.parse(vm_id("kms-ok")))
    waiting = await remediator.check(VmId.parse(vm_id("avma-nokms")))
    assert (healthy.kind, healthy.reason) == (OutcomeKind.HEALTHY, "kms-client-licensed")
    assert healthy.details["conditionalRekey"]["failed"] == ["channel"]
    # still activated by its host: never re-keyed while the KMS is out of reach (shared.decide)
    assert (waiting.kind, waiting.reason) == (OutcomeKind.DEFERRED, "kms-unreachable")
    assert waiting.details["conditionalRekey"]["failed"] == ["kmsProbe"]
    for name in ("kms-ok", "avma-nokms"):
        [run] = sim.run_log(vm_id(name))
        assert is_conditional(run) and run["before"] == run["after"]
        assert state(sim, name)["changed"] is False


async def test_audit_mode_never_sends_a_key_and_enforce_sends_it_in_the_first_run_command(
    engine: Any, sim: Simulator
) -> None:
    audit = engine(Mode.AUDIT)
    for name in ("avma-dc", "kms-ok", "avma-std-named-dc", "avma-nokms"):
        outcome = await audit.check(VmId.parse(vm_id(name)))
        assert outcome.kind is not OutcomeKind.REMEDIATED
        [run] = sim.run_log(vm_id(name))
        assert run["script"] == "detect" and "ProductKey" not in run["parameters"], name
        assert state(sim, name)["changed"] is False
    await engine().check(VmId.parse(vm_id("avma-dc")))
    first_enforced = sim.run_log(vm_id("avma-dc"))[1]
    assert is_conditional(first_enforced) and "ProductKey" in first_enforced["parameters"]


class LeaseLost(Exception):
    pass


async def test_no_post_when_the_hook_before_the_conditional_rekey_refuses(
    engine: Any, sim: Simulator
) -> None:
    """The worker renews its lease and records the intent in this hook; if that fails, nothing is sent."""

    async def lost(phase: str, details: Mapping[str, Any]) -> None:
        raise LeaseLost(phase)

    with pytest.raises(LeaseLost, match="remediate"):
        await engine().check(VmId.parse(vm_id("avma-dc")), before_run_command=lost)
    assert sim.run_log(vm_id("avma-dc")) == []


class FakeCompute:
    """ARM answered from a script: the VM as ARM names it, then the given Run Command output."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.bodies: list[Mapping[str, Any]] = []

    async def get_vm(self, vm: VmId) -> VmFacts:
        return VmFacts(
            vm,
            "Windows",
            "running",
            True,
            os_name="Windows Server 2022 Datacenter",
            os_version="Microsoft Windows NT 10.0.20348.0",
        )

    async def run_command(self, vm: VmId, body_: Mapping[str, Any]) -> tuple[str, str]:
        self.bodies.append(body_)
        return self.output, ""


def met_line(before: dict[str, Any]) -> str:
    guest = WindowsGuest(
        caption="Microsoft Windows Server 2022 Datacenter",
        build=20348,
        product_type=3,
        edition_id="ServerDatacenter",
        sku=8,
        channel="AVMA",
        license_status=5,
        partial_product_key="DV9BG",
        grace_minutes=0,
        kms_machine=None,
        kms_port=0,
        discovered_machine=None,
        discovered_port=0,
        kms_reachable=True,
    )
    command = body(dc_expectation())
    line = guest.run_script(command["script"], command["parameters"]).splitlines()[-1]
    document = json.loads(line[len(RESULT_MARKER) :])
    assert document["preconditions"]["met"] is True
    document["preconditions"]["before"].update(before)
    return RESULT_MARKER + json.dumps(document)


async def test_a_met_rekey_that_reports_facts_outside_its_conditions_is_never_trusted() -> None:
    settings_ = Settings.from_env({"REMEDIATION_MODE": "enforce"})
    honest = await Remediator(FakeCompute(met_line({})), settings_).check(VmId.parse(vm_id("x")))
    assert (honest.kind, honest.reason) == (OutcomeKind.REMEDIATED, "avma-channel")
    for lie in (
        {"editionId": "ServerRdsh"},
        {"sku": 175},
        {"productKeyChannel": "Retail"},
        {"kmsReachable": False},
    ):
        outcome = await Remediator(FakeCompute(met_line(lie)), settings_).check(VmId.parse(vm_id("x")))
        assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "bad-output"), lie
        assert "outside the preconditions" in outcome.details["error"]


async def test_the_version_guard_on_a_conditional_rekey_is_decided_as_a_detection() -> None:
    line = (
        'AVMA-REMEDIATOR-RESULT {"schema":2,"script":"remediate","os":null,"license":null,"kmsProbe":null,'
        '"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032",'
        '"message":"Windows PowerShell 2.0 is older than 3.0"}}'
    )
    compute = FakeCompute(line)
    outcome = await Remediator(compute, Settings.from_env({"REMEDIATION_MODE": "enforce"})).check(
        VmId.parse(vm_id("x"))
    )
    assert (outcome.kind, outcome.reason) == (OutcomeKind.FAILED, "powershell-version")
    assert len(compute.bodies) == 1  # nothing was done, and nothing more is sent


# --- the contract: parser and size ---------------------------------------------------------------


def conditional_document(**preconditions: Any) -> dict[str, Any]:
    document = json.loads(met_line({})[len(RESULT_MARKER) :])
    document["preconditions"].update(preconditions)
    return document


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"failed": ["sku"]}, "met, yet a fact failed"),
        ({"before": None}, "met, yet a fact failed or none was read"),
        ({"met": False}, "not met, so a fact failed and nothing was done"),
        ({"met": False, "failed": ["sku"]}, "nothing was done"),  # steps reported
        ({"failed": ["sku", "sku"]}, "unknown or repeated"),
        ({"failed": ["guess"]}, "unknown or repeated"),
        ({"met": 1}, "expected true or false"),
    ],
)
def test_the_parser_holds_preconditions_to_their_shape(change: dict[str, Any], problem: str) -> None:
    document = conditional_document(**change)
    with pytest.raises(GuestOutputError, match=problem):
        parse_result(RESULT_MARKER + json.dumps(document), expected_script="remediate")


def test_only_the_remediation_script_reports_preconditions() -> None:
    document = conditional_document()
    document.update(script="detect", steps=[])
    with pytest.raises(GuestOutputError, match="only a conditional re-key"):
        parse_result(RESULT_MARKER + json.dumps(document), expected_script="detect")
    valid = parse_result(met_line({}), expected_script="remediate")
    assert valid.preconditions is not None and valid.preconditions.met
    assert (
        valid.preconditions.before is not None and valid.preconditions.before.edition_id == "ServerDatacenter"
    )


WORST_PRECONDITIONS_BYTES = 2905  # measured below; docs/guest-contract.md states it


def test_the_worst_case_line_with_preconditions_stays_well_under_4_kb() -> None:
    from tests.test_guest_scripts import _limits

    limits, cost = _limits("remediate"), script_cost()
    sizes = {}
    for filler in FILLERS:
        document = _worst_document(filler, "remediate")
        document["preconditions"] = {
            "met": True,
            "failed": [],
            "before": {
                "editionId": short_text(filler * 400, limits["editionId"], cost),
                "sku": 4294967295,
                "build": 4294967295,
                "productType": 4294967295,
                "productKeyChannel": short_text(filler * 400, limits["productKeyChannel"], cost),
                "licenseStatus": 6,
                "kmsReachable": True,
            },
        }
        line = RESULT_MARKER + ps51_json(document)
        parsed = parse_result(line, expected_script="remediate")
        assert parsed.preconditions is not None
        sizes[repr(filler)] = len(line.encode("ascii"))
    worst = max(sizes.values())
    assert worst == WORST_PRECONDITIONS_BYTES, sizes
    assert worst + 2 < 3500


# --- the queue path ------------------------------------------------------------------------------


async def test_through_the_function_code_the_intent_row_precedes_the_one_run_command(
    sim: Simulator, azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.ledger import Ledger
    from tests.test_function_app import user

    env = {
        **sim.env(),
        "AzureWebJobsStorage": azurite.connection_string,
        "REMEDIATION_MODE": "enforce",
        "LEDGER_TABLE": "one" + uuid.uuid4().hex[:12],
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    message = json.dumps({"reason": "manual", "vmId": vm_id("avma-dc"), "correlationId": "one-1"})
    await user("vm_check")(QueueMessage(id="m1", body=message.encode(), dequeue_count=1))
    async with Ledger.from_settings(Settings.from_env(env)) as ledger:
        rows = await ledger.history(VmId.parse(vm_id("avma-dc")))
    assert [(r["entry"], r["outcome"], r["reason"]) for r in rows] == [
        ("outcome", "remediated", "avma-channel"),
        ("intent", "intent", "remediate:avma-channel"),
    ]
    assert rows[1]["details"]["conditional"] is True
    [run] = sim.run_log(vm_id("avma-dc"))
    assert is_conditional(run)
    assert sim.run_commands_per_fixed_vm() == 1.0
    assert nt_version(20348) == "10.0.20348"  # what ARM's osVersion is built from in the simulator


async def test_a_hook_that_answers_detect_first_gets_the_two_step_path_and_no_key_first(
    engine: Any, sim: Simulator
) -> None:
    """``apply`` (shared.plan) compares a fresh detection with its plan before any change."""
    from shared.workflow import DetectFirst

    phases: list[str] = []

    async def detect_first(phase: str, details: Mapping[str, Any]) -> None:
        phases.append(phase)
        if details.get("conditional"):
            raise DetectFirst

    outcome = await engine().check(VmId.parse(vm_id("avma-dc")), before_run_command=detect_first)
    assert (outcome.kind, outcome.reason) == (OutcomeKind.REMEDIATED, "avma-channel")
    assert [run["script"] for run in sim.run_log(vm_id("avma-dc"))] == ["detect", "remediate"]
    assert phases == ["remediate", "detect", "remediate"]  # refused, then the ordinary two steps
    assert "conditionalRekey" not in outcome.details
