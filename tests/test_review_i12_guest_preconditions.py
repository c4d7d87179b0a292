"""Review of issue 12: remediate.ps1's conditional re-key, run as written (tests/ps_subset.py
evaluates the script's own statements without PowerShell), against the engine and the simulator.

No test on main ran the script's comparisons: the simulator's guest (``simulator.guest``) is a
Python copy of them, and tests/test_guest_scripts.py checks the script's syntax, parameters and a
few lines by text. A script that compared one fact loosely, or not at all, passed every test. Here
the script's ``Get-UnmetPreconditions``/``Get-BeforeFacts`` and its top-level flow run on fact sets
(``Add-Facts`` and the WMI steps stand in: they read or change a real VM), and must agree with:

- the engine: the script acts only if the facts are ones ``Expectation.accepts`` takes and the
  description carries the AVMA word, and then the decision table (``shared.decide``) re-keys them
  with this very catalog row;
- the simulator's copy (``simulator.guest.unmet_preconditions``): the same names fail;
- the guest contract (docs/guest-contract.md, "Conditional re-key"): a fact that differs changes
  nothing (no step runs) and the result carries the facts read, with the failed names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import catalog, guessed_rekey
from shared.catalog import AVMA_MIN_BUILD, CATALOG, CatalogEntry, entry_for_arm_os
from shared.decide import Action, decide
from shared.guessed_rekey import Expectation, expectation_for
from shared.guest.facts import RESULT_MARKER, STEP_NAMES, LicenseStatus, OsFacts, parse_result
from shared.guest.scripts import REMEDIATE, RunCommandInput, conditional_rekey_command
from shared.model import VmId
from shared.settings import Settings
from shared.vm import VmFacts
from simulator.guest import unmet_preconditions
from tests.ps_subset import CaseDict, Interpreter, PsRuntimeError

VM_ID = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
KMS_HOST = "azkms.core.windows.net"
KMS_PORT = 1688
ENFORCE = Settings.from_env({"REMEDIATION_MODE": "enforce", "KMS_HOST": KMS_HOST})
GOOD_OTHER_KEY = "N69G4-B89J2-4G8F4-WWYCC-J464C"
AVMA_DESCRIPTION = "Windows(R) Operating System, VIRTUAL_MACHINE_ACTIVATION channel"
SOURCE = ("\n".join(REMEDIATE.lines) + "\n").encode("ascii")
SERVER_ROWS = [e for e in CATALOG if e.product_type == "server" and next(iter(e.builds)) >= AVMA_MIN_BUILD]


def as_ps(value: Any) -> Any:
    """JSON-like facts as the script holds them: hashtables whose keys ignore case."""
    if isinstance(value, Mapping):
        table = CaseDict()
        for key, item in value.items():
            table[key] = as_ps(item)
        return table
    return value


def as_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


@dataclass
class Run:
    result: dict[str, Any]
    steps: list[str]
    written: list[str]
    facts_read: int = 0
    calls: list[str] = field(default_factory=list)

    @property
    def preconditions(self) -> dict[str, Any]:
        found = self.result.get("preconditions")
        assert isinstance(found, dict), self.result
        return found

    def line(self) -> str:
        document = {**self.result, "steps": [{"name": s, "hresult": "0x00000000"} for s in self.steps]}
        return RESULT_MARKER + json.dumps(document)


def run_remediate(command: RunCommandInput, facts: Mapping[str, Any]) -> Run:
    """remediate.ps1 on a VM whose Add-Facts reads ``facts`` and whose WMI steps all succeed."""
    run = Run(result={}, steps=[], written=[])

    def add_facts(_: Interpreter, result: CaseDict, host: str, port: int) -> None:
        run.facts_read += 1
        assert (host, port) == (KMS_HOST, KMS_PORT)
        for key in ("os", "license", "kmsProbe", "attestation", "error"):
            result.set_ci(key, as_ps(facts.get(key)))

    def invoke_step(_: Interpreter, name: str, block: object) -> None:
        run.steps.append(name)

    def write_result(_: Interpreter, result: CaseDict, steps: object) -> None:
        run.result = as_json(result)

    def script_error(_: Interpreter, step: str, hresult: int, message: str) -> CaseDict:
        return as_ps({"step": step, "hresult": f"0x{hresult & 0xFFFFFFFF:08X}", "message": message})

    def get_hresult(_: Interpreter, error: object) -> int:
        return 0x80004005

    def error_text(_: Interpreter, error: object) -> str:
        return str(error)

    stand_ins = {
        "remove-typedata": lambda _, *args: None,
        "add-facts": add_facts,
        "invoke-step": invoke_step,
        "write-output": lambda _, *args: run.written.extend(str(a) for a in args),
        "new-scripterror": script_error,
        "get-hresult": get_hresult,
        "get-errortext": error_text,
        "write-result": write_result,
    }
    interpreter = Interpreter(SOURCE, stand_ins)
    interpreter.script_scope["psversiontable"] = as_ps({"PSVersion": {"Major": 5, "Minor": 1}})
    interpreter.run_script({p["name"]: p["value"] for p in command["parameters"]})
    return run


def command_for(expectation: Expectation) -> RunCommandInput:
    return conditional_rekey_command(
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


def expectation_of(row: CatalogEntry) -> Expectation:
    build = next(iter(row.builds))
    nt = "6.3" if build == 9600 else "10.0"
    found = expectation_for(
        VmFacts(
            vm_id=VmId.parse(VM_ID),
            os_type="Windows",
            power_state="running",
            agent_ready=True,
            os_name=row.edition,
            os_version=f"Microsoft Windows NT {nt}.{build}.0",
        ),
        ENFORCE,
    )
    assert found is not None, row.edition
    return found


def facts(
    *,
    edition_id: str = "ServerDatacenter",
    sku: int = 8,
    build: int = 20348,
    product_type: int = 3,
    description: str = AVMA_DESCRIPTION,
    key_channel: str | None = None,
    status: int = 1,
    reachable: bool = True,
    os_read: bool = True,
    license_read: bool = True,
    error: dict[str, Any] | None = None,
    probe: bool = True,
) -> dict[str, Any]:
    """What Add-Facts reads (the shape of docs/guest-contract.md's detection result)."""
    return {
        "os": {
            "caption": "Microsoft Windows Server",
            "version": f"10.0.{build}",
            "build": build,
            "productType": product_type,
            "sku": sku,
            "editionId": edition_id,
        }
        if os_read
        else None,
        "license": {
            "name": "Windows(R), ServerDatacenter edition",
            "description": description,
            "productKeyChannel": key_channel,
            "partialProductKey": "ABCDE",
            "licenseStatus": status,
            "graceMinutes": 0,
            "kmsMachine": None,
            "kmsPort": 0,
            "discoveredKmsMachine": None,
            "discoveredKmsPort": 0,
        }
        if license_read
        else None,
        "kmsProbe": {"host": KMS_HOST, "port": KMS_PORT, "reachable": reachable, "error": None}
        if probe
        else None,
        "attestation": None,
        "error": error,
    }


def detection_of(read: Mapping[str, Any]) -> Any:
    document = {"schema": 2, "script": "detect", **read, "steps": []}
    return parse_result(RESULT_MARKER + json.dumps(document), expected_script="detect")


# --- one fact off ---------------------------------------------------------------------------------

DC2022 = next(e for e in CATALOG if e.edition == "Windows Server 2022 Datacenter")


def test_the_exact_facts_are_acted_on_with_every_step_after_one_reading() -> None:
    run = run_remediate(command_for(expectation_of(DC2022)), facts())
    assert run.preconditions == {
        "met": True,
        "failed": [],
        "before": {
            "editionId": "ServerDatacenter",
            "sku": 8,
            "build": 20348,
            "productType": 3,
            "productKeyChannel": None,
            "licenseStatus": 1,
            "kmsReachable": True,
        },
    }
    assert run.steps == list(STEP_NAMES)
    assert run.facts_read == 2  # before (to compare) and after (to report), as any remediation
    parsed = parse_result(run.line(), expected_script="remediate")
    assert parsed.preconditions is not None and parsed.preconditions.before is not None
    assert expectation_of(DC2022).accepts(parsed.preconditions.before)


ONE_OFF = [
    ("channel", {"description": "Windows(R) Operating System, VOLUME_KMSCLIENT channel"}),
    ("channel", {"description": AVMA_DESCRIPTION.lower()}),
    ("editionId", {"edition_id": "ServerStandard"}),
    ("editionId", {"edition_id": "serverdatacenter"}),  # the engine ignores case; the script must not
    ("editionId", {"edition_id": "ServerTurbine"}),
    ("sku", {"sku": 7}),
    ("sku", {"sku": 407}),
    ("build", {"build": 17763}),
    ("build", {"build": 26100}),
    ("productType", {"product_type": 1}),
    ("productKeyChannel", {"key_channel": "Retail"}),
    ("productKeyChannel", {"key_channel": "volume:mak"}),
    ("productKeyChannel", {"key_channel": "OEM:NONSLP"}),
    ("productKeyChannel", {"key_channel": "Volume:CSVLK"}),
    ("productKeyChannel", {"key_channel": "Volume:GVLK "}),  # not plain: trailing white space
    ("productKeyChannel", {"key_channel": "Ret\u0430il"}),  # not plain: Cyrillic a
    ("productKeyChannel", {"key_channel": " "}),  # not plain, not empty: white space only
    ("kmsProbe", {"reachable": False}),
    ("kmsProbe", {"probe": False}),
]


@pytest.mark.parametrize(("name", "change"), ONE_OFF, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ONE_OFF)])
def test_one_fact_off_changes_nothing_and_reports_the_facts_it_read(
    name: str, change: dict[str, Any]
) -> None:
    read = facts(**change)
    run = run_remediate(command_for(expectation_of(DC2022)), read)
    assert run.preconditions["met"] is False
    assert run.preconditions["failed"] == [name]
    assert run.steps == []  # nothing changed: no install-key, no KMS setting, no activation
    assert run.facts_read == 1
    assert (run.result["os"], run.result["license"], run.result["kmsProbe"]) == (
        read["os"],
        read["license"],
        read["kmsProbe"],
    )
    assert run.result["error"] is None
    assert f"Preconditions not met, nothing changed: {name}" in run.written
    # the simulator's copy of the comparison names the same fact
    params = {p["name"].lower(): p["value"] for p in command_for(expectation_of(DC2022))["parameters"]}
    assert unmet_preconditions(read, params) == [name]
    if read["kmsProbe"] is not None:  # (Test-KmsConnection always answers; the parser needs it)
        parsed = parse_result(run.line(), expected_script="remediate")
        assert parsed.preconditions is not None and parsed.preconditions.before is not None
        assert not parsed.preconditions.met
        # and the engine, reading the same facts, would not have trusted a re-key on them either
        # (the channel word is not among the facts it is told; the script alone checks it)
        if name != "channel":
            assert not expectation_of(DC2022).accepts(parsed.preconditions.before)


@pytest.mark.parametrize(
    "read",
    [
        facts(os_read=False),
        facts(license_read=False),  # no Windows product carries a key (Read-LicenseFacts: $null)
        facts(error={"step": "read-license", "hresult": "0x80041010", "message": "Invalid class"}),
    ],
)
def test_facts_that_could_not_be_read_change_nothing(read: dict[str, Any]) -> None:
    run = run_remediate(command_for(expectation_of(DC2022)), read)
    assert run.preconditions == {"met": False, "failed": ["facts"], "before": None}
    assert run.steps == []
    assert run.result["error"] == read["error"]


def drop(command: RunCommandInput, name: str, value: str | None = None) -> RunCommandInput:
    kept = [p for p in command["parameters"] if p["name"] != name]
    if value is not None:
        kept.append({"name": name, "value": value})
    return {**command, "parameters": kept}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ExpectChannel", None),
        ("ExpectEditionIds", None),
        ("ExpectSkus", None),
        ("ExpectBuild", None),
        ("ExpectProductTypes", None),
        ("RefuseKeyChannels", None),
        ("InstallKey", "0"),
        ("ExpectChannel", "virtual_machine_activation"),
        ("ExpectEditionIds", "ServerDatacenter,"),
        ("ExpectSkus", "8,x"),
        ("ExpectBuild", "20348.1"),
        ("ExpectProductTypes", "3,4"),
        ("RefuseKeyChannels", "Retail,,OEM:"),
    ],
)
def test_a_conditional_rekey_missing_or_with_a_bad_condition_changes_nothing(
    name: str, value: str | None
) -> None:
    command = drop(command_for(expectation_of(DC2022)), name, value)
    if name == "InstallKey":
        command = drop(command, "ProductKey")
    run = run_remediate(command, facts())
    assert run.steps == [] and run.facts_read == 0
    assert run.result["error"]["step"] == "parameters"
    assert "preconditions" not in run.result


CONDITIONS = [
    "ExpectChannel",
    "ExpectEditionIds",
    "ExpectSkus",
    "ExpectBuild",
    "ExpectProductTypes",
    "RefuseKeyChannels",
]


@pytest.mark.parametrize("only", CONDITIONS)
def test_any_one_condition_alone_makes_it_conditional_and_so_a_parameters_error(only: str) -> None:
    """Any Expect*/RefuseKeyChannels parameter makes the script a conditional re-key (the guest
    contract): given alone, the others are missing, so nothing is done, never an unconditional
    re-key with the key it was given."""
    command = command_for(expectation_of(DC2022))
    for name in CONDITIONS:
        if name != only:
            command = drop(command, name)
    run = run_remediate(command, facts())
    assert run.steps == [] and run.facts_read == 0
    assert run.result["error"]["step"] == "parameters"


# --- the script, the engine and the simulator agree on every fact set -----------------------------

EDITION_IDS = sorted(
    {i for e in SERVER_ROWS for i in e.edition_ids}
    | {"ServerRdsh", "serverdatacenter", "SERVERSTANDARD", "ServerDatacenterEval", "", "ServerDatacenter "}
)
KEY_CHANNELS = [
    None,
    "",
    "Volume:GVLK",
    "Volume:AVMA",
    "Retail",
    "retail",
    "RETAIL:TB:Eval",
    "Volume:MAK",
    "volume:mak",
    "Volume:CSVLK",
    "OEM:DM",
    "oem:slp",
    "OEM:NONSLP",
    "Volume:GVLK ",
    "Volume GVLK",
    "Ret\u0430il",
    "Volume:\u0130",
    "x" * 41,
]
DESCRIPTIONS = [
    AVMA_DESCRIPTION,
    "Windows(R) Operating System, VOLUME_KMSCLIENT channel",
    "Windows(R) Operating System, RETAIL channel",
    AVMA_DESCRIPTION.lower(),
    "VIRTUAL_MACHINE_ACTIVATION",
    "",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row=st.sampled_from(SERVER_ROWS),
    edition_id=st.sampled_from(EDITION_IDS),
    sku=st.sampled_from([0, 7, 8, 12, 13, 50, 147, 148, 175, 407, 408, 409]),
    build=st.sampled_from([9600, 14393, 17763, 20348, 26100]),
    product_type=st.sampled_from([1, 2, 3]),
    description=st.sampled_from(DESCRIPTIONS),
    key_channel=st.sampled_from(KEY_CHANNELS),
    status=st.integers(0, 6),
    reachable=st.booleans(),
)
def test_the_script_acts_exactly_when_the_engine_would_rekey_with_this_row(
    row: CatalogEntry,
    edition_id: str,
    sku: int,
    build: int,
    product_type: int,
    description: str,
    key_channel: str | None,
    status: int,
    reachable: bool,
) -> None:
    expectation = expectation_of(row)
    command = command_for(expectation)
    read = facts(
        edition_id=edition_id,
        sku=sku,
        build=build,
        product_type=product_type,
        description=description,
        key_channel=key_channel,
        status=status,
        reachable=reachable,
    )
    run = run_remediate(command, read)
    pre = run.preconditions
    params = {p["name"].lower(): p["value"] for p in command["parameters"]}
    assert pre["failed"] == unmet_preconditions(read, params)  # the simulator's copy agrees
    parsed = parse_result(run.line(), expected_script="remediate")
    assert parsed.preconditions is not None and parsed.preconditions.before is not None
    accepted = (
        expectation.accepts(parsed.preconditions.before) and "VIRTUAL_MACHINE_ACTIVATION" in description
    )
    assert pre["met"] is accepted  # the engine's reading of what the script must have checked
    if pre["met"]:
        assert run.steps == list(STEP_NAMES)
        decision = decide(detection_of(read), ENFORCE)
        assert (decision.action, decision.reason, decision.entry) == (Action.REKEY, "avma-channel", row)
    else:
        assert run.steps == [] and pre["failed"]
        assert run.result["os"] == read["os"] and run.result["license"] == read["license"]


# --- the engine's verification before it offers a conditional re-key -----------------------------


def test_a_row_arm_names_whose_facts_the_table_reads_as_another_row_is_never_offered() -> None:
    """The table is asked on the row's own facts and must answer with that very row: a row whose
    EditionIDs, SKUs and build are another row's (the catalog wrong, or two rows alike) gives None."""
    twin = dataclasses.replace(
        DC2022, edition="Windows Server 2022 Datacenter (twin)", product_key=GOOD_OTHER_KEY
    )
    assert guessed_rekey._verified(twin, 20348, ENFORCE) is None
    assert guessed_rekey._verified(DC2022, 20348, ENFORCE) is not None


@pytest.mark.parametrize("refused", ["status", "key channel"])
def test_every_license_status_and_key_channel_the_script_does_not_check_is_verified(
    refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script does not compare the license status, nor a ProductKeyChannel it does not refuse:
    so the engine must have asked the table about each of them. A table that would not re-key one
    of them (here: Notification, or Volume:GVLK) means no conditional re-key."""
    real = guessed_rekey.decide

    def table(result: Any, settings: Settings) -> Any:
        license = result.license
        if (refused == "status" and license.license_status == LicenseStatus.NOTIFICATION) or (
            refused == "key channel" and license.product_key_channel == "Volume:GVLK"
        ):
            return dataclasses.replace(real(result, settings), action=Action.NONE, reason="not-this")
        return real(result, settings)

    monkeypatch.setattr(guessed_rekey, "decide", table)
    guessed_rekey._verified.cache_clear()
    try:
        assert guessed_rekey._verified(DC2022, 20348, ENFORCE) is None
    finally:
        guessed_rekey._verified.cache_clear()


def test_the_build_the_command_names_is_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """ARM's version names the build the guest must show; a row of another build is no match."""
    dc2019 = next(e for e in CATALOG if e.edition == "Windows Server 2019 Datacenter")
    monkeypatch.setattr(guessed_rekey, "entry_for_arm_os", lambda name, version: dc2019)
    vm = VmFacts(
        VmId.parse(VM_ID),
        "Windows",
        "running",
        True,
        os_name=dc2019.edition,
        os_version="Microsoft Windows NT 10.0.20348.0",
    )
    assert expectation_for(vm, ENFORCE) is None


def test_refused_prefixes_that_miss_a_channel_the_table_calls_another_are_caught() -> None:
    assert guessed_rekey._refusals_cover_the_table(guessed_rekey.REFUSED_KEY_CHANNELS)
    for missing in guessed_rekey.REFUSED_KEY_CHANNELS:
        fewer = tuple(p for p in guessed_rekey.REFUSED_KEY_CHANNELS if p != missing)
        assert not guessed_rekey._refusals_cover_the_table(fewer), missing


@pytest.mark.parametrize(
    "os_name",
    [
        "Windows Server 2022 Standard Datacenter",  # two editions named
        "Windows Server 2022 Datacenter / Standard",
        "Windows Server 2022 Datacenter Datacenter",
        "Windows Server 2022 Datacenter Azure Edition Azure Edition",
        "windows server 2022 datacenter",  # written otherwise than the table: no guess
        "WINDOWS SERVER 2022 DATACENTER",
        "Windows Server 2022  Datacenter",
        "Windows Server 2022 Datacenter\u00a0Azure Edition",
        "Windows Server 2022 Datacenter Evaluation",
        "Windows 10 Enterprise multi-session",
        "Windows 11 Enterprise multi-session",
        "Windows 11 Enterprise",
    ],
)
def test_an_os_name_that_names_no_single_row_as_the_table_writes_it_gives_no_guess(os_name: str) -> None:
    assert entry_for_arm_os(os_name, "10.0.20348.4297") is None
    assert entry_for_arm_os(os_name, "Microsoft Windows NT 10.0.22631.0") is None


def test_an_os_name_two_rows_share_gives_no_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    twin = dataclasses.replace(DC2022, product_key=GOOD_OTHER_KEY)
    monkeypatch.setattr(catalog, "CATALOG", (*catalog.CATALOG, twin))
    assert entry_for_arm_os("Windows Server 2022 Datacenter", "10.0.20348.4297") is None
    # and the guest's own facts, read by detection, name no single key either
    dc = OsFacts(caption="", version="", build=20348, product_type=3, sku=8, edition_id="ServerDatacenter")
    assert catalog.select_key(dc) is None


def test_the_evaluator_refuses_what_it_does_not_model() -> None:
    """A mutant that rewrote a comparison with an operator or method outside the subset must fail
    loudly, never be given a meaning: the evaluator raises, the test fails."""
    from tests.ps_subset import Unsupported

    for snippet in (b"$a = 'x' -like 'x'", b"$a = 'x'.ToLower()", b"$a = 1 | Out-Null"):
        with pytest.raises(Unsupported):
            Interpreter(snippet).run_script({})
    with pytest.raises(PsRuntimeError):
        Interpreter(b"$a = $null.Split(',')").run_script({})
