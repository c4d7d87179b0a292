"""The decision table, row by row, as a pure function (no server)."""

from __future__ import annotations

import pytest

from shared.catalog import select_key
from shared.decide import Action, decide, gate, is_azure_edition, is_opted_out
from shared.guest.facts import AttestationFacts, GuestResult, OsFacts, ScriptError, Step, parse_result
from shared.hints import hint_for, remediation_hint
from shared.model import OutcomeKind, VmId
from shared.settings import Mode, Settings
from shared.verify import judge
from shared.vm import VmFacts
from tests.guestfacts import (
    ATTESTED,
    AZURE_EDITION_2022,
    BAD_CHAIN,
    MULTI_SESSION,
    NO_IMDS,
    ODD_EDITION,
    SERVER_2019_STD,
    SERVER_2022_DC,
    detected,
    license_facts,
    remediated,
)

VM = VmId.parse(
    "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
)
SETTINGS = Settings.from_env({})
OVERRIDE = Settings.from_env({"ALLOW_CUSTOM_KMS_OVERRIDE": "true"})


def vm(**kw: object) -> VmFacts:
    base: dict[str, object] = {
        "vm_id": VM,
        "os_type": "Windows",
        "power_state": "running",
        "agent_ready": True,
        "tags": {},
    }
    base.update(kw)
    return VmFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "kind", "reason"),
    [
        (vm(os_type="Linux"), OutcomeKind.SKIPPED, "not-windows"),
        (vm(os_type=None), OutcomeKind.SKIPPED, "not-windows"),
        (vm(tags={"avma-remediator-opt-out": "true"}), OutcomeKind.SKIPPED, "opted-out"),
        (vm(tags={"AVMA-Remediator-Opt-Out": ""}), OutcomeKind.SKIPPED, "opted-out"),
        (vm(power_state="deallocated"), OutcomeKind.SKIPPED, "not-running"),
        (vm(power_state="stopped"), OutcomeKind.SKIPPED, "not-running"),
        (vm(power_state="stopping"), OutcomeKind.SKIPPED, "not-running"),
        (vm(power_state="deallocating"), OutcomeKind.SKIPPED, "not-running"),
        (vm(power_state="starting"), OutcomeKind.DEFERRED, "vm-starting"),
        (vm(power_state="unknown"), OutcomeKind.DEFERRED, "power-state-unknown"),
        (vm(power_state="hibernating"), OutcomeKind.DEFERRED, "power-state-unknown"),
        (vm(agent_ready=False), OutcomeKind.DEFERRED, "agent-not-ready"),
    ],
)
def test_gate_rows(facts: VmFacts, kind: OutcomeKind, reason: str) -> None:
    decision = gate(facts, SETTINGS)
    assert decision is not None
    assert (decision.kind, decision.reason, decision.action) == (kind, reason, Action.NONE)


def test_gate_passes_a_running_windows_vm_with_a_ready_agent() -> None:
    assert gate(vm(), SETTINGS) is None


def test_gate_leaves_the_agent_and_power_rows_to_the_full_read_when_a_listing_does_not_say() -> None:
    assert gate(vm(agent_ready=None), SETTINGS) is None
    assert gate(vm(agent_ready=None, power_state=None), SETTINGS) is None


@pytest.mark.parametrize("state", ["starting", "stopping", "deallocating", "unknown", "hibernating"])
def test_a_listing_s_transitional_power_state_is_no_verdict(state: str) -> None:
    """A statusOnly listing is read before the VM: a state in passing is left for the full read."""
    assert gate(vm(agent_ready=None, power_state=state), SETTINGS) is None


@pytest.mark.parametrize("state", ["stopped", "deallocated"])
def test_a_listing_s_settled_power_state_still_skips(state: str) -> None:
    decision = gate(vm(agent_ready=None, power_state=state), SETTINGS)
    assert decision is not None and (decision.kind, decision.reason) == (OutcomeKind.SKIPPED, "not-running")


def test_opt_out_tag_is_configurable_and_false_means_not_opted_out() -> None:
    custom = Settings.from_env({"OPT_OUT_TAG": "keep-my-license"})
    assert is_opted_out(vm(tags={"keep-my-license": "yes"}), custom.opt_out_tag)
    assert not is_opted_out(vm(tags={"avma-remediator-opt-out": "true"}), custom.opt_out_tag)
    assert not is_opted_out(vm(tags={"avma-remediator-opt-out": "false"}), SETTINGS.opt_out_tag)
    # the tag row comes before the power row: an opted-out VM is reported as such whatever its state
    decision = gate(vm(tags={"keep-my-license": "1"}, power_state="deallocated"), custom)
    assert decision is not None and decision.reason == "opted-out"


@pytest.mark.parametrize("value", ["false", "no", "0", "False", "NO"])
def test_an_opt_out_tag_of_false_no_or_0_is_not_an_opt_out(value: str) -> None:
    """README: any value but false/no/0 opts out; those three (in any case) leave the VM in scope."""
    assert not is_opted_out(vm(tags={"avma-remediator-opt-out": value}), SETTINGS.opt_out_tag)
    assert gate(vm(tags={"avma-remediator-opt-out": value}), SETTINGS) is None


@pytest.mark.parametrize("value", ["true", "yes", "1", "", "off", "n"])
def test_any_other_opt_out_value_opts_out(value: str) -> None:
    decision = gate(vm(tags={"avma-remediator-opt-out": value}), SETTINGS)
    assert decision is not None and decision.reason == "opted-out"


@pytest.mark.parametrize(
    ("state", "reason"),
    [("Running", None), ("RUNNING", None), ("Deallocated", "not-running"), ("Starting", "vm-starting")],
)
def test_a_power_state_code_is_read_whatever_its_case(state: str, reason: str | None) -> None:
    """ARM writes the codes in lower case (``PowerState/running``: states-billing.md, the SDKs'
    PowerState enums); the gate does not depend on it: a running VM read as ``Running`` is not
    deferred as an unknown state (which would leave it unfixed for good)."""
    decision = gate(vm(power_state=state), SETTINGS)
    assert (decision.reason if decision is not None else None) == reason


def test_avma_with_a_known_edition_is_rekeyed_with_that_editions_key() -> None:
    decision = decide(detected(), SETTINGS)
    assert decision.action is Action.REKEY
    assert decision.entry is not None
    assert decision.entry.edition == "Windows Server 2022 Datacenter"
    assert decision.entry.product_key == "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"
    other = decide(detected(SERVER_2019_STD), SETTINGS)
    assert other.entry is not None and other.entry.product_key == "N69G4-B89J2-4G8F4-WWYCC-J464C"


def test_avma_is_rekeyed_even_when_the_kms_probe_fails_so_it_self_heals_once_routed() -> None:
    assert decide(detected(reachable=False), SETTINGS).action is Action.REKEY


ENFORCE = SETTINGS.with_mode(Mode.ENFORCE)
AUDIT = SETTINGS.with_mode(Mode.AUDIT)


def test_a_licensed_avma_vm_is_not_rekeyed_while_the_kms_is_unreachable() -> None:
    """A GVLK would drop the host's activation at once and nothing would activate it: wait."""
    guest = detected(lic=license_facts("AVMA", 1), reachable=False)
    decision = decide(guest, ENFORCE)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.DEFERRED,
        "kms-unreachable",
    )
    # reachable again: re-keyed as any AVMA VM
    assert decide(detected(lic=license_facts("AVMA", 1)), ENFORCE).action is Action.REKEY
    # not licensed: no worse off after the re-key, so it goes ahead and self-heals once routed
    unlicensed = decide(detected(lic=license_facts("AVMA", 5), reachable=False), ENFORCE)
    assert (unlicensed.action, unlicensed.reason) == (Action.REKEY, "avma-channel")


@pytest.mark.parametrize(
    ("status", "reason"),
    [(1, "avma-licensed-kms-unreachable"), (5, "avma-kms-unreachable"), (0, "avma-kms-unreachable")],
)
def test_audit_shows_an_unreachable_kms_with_its_own_reason(status: int, reason: str) -> None:
    decision = decide(detected(lic=license_facts("AVMA", status), reachable=False), AUDIT)
    assert (decision.action, decision.kind, decision.reason) == (Action.REKEY, None, reason)
    assert decide(detected(lic=license_facts("AVMA", status)), AUDIT).reason == "avma-channel"
    assert "next hop Internet" in hint_for(reason, AUDIT)


def test_avma_with_an_unknown_edition_is_never_guessed() -> None:
    decision = decide(detected(ODD_EDITION), SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.SKIPPED,
        "unknown-edition",
    )


@pytest.mark.parametrize("channel", ["AVMA", "KMS_CLIENT", "RETAIL"])
def test_multi_session_is_never_rekeyed_whatever_the_channel(channel: str) -> None:
    decision = decide(detected(MULTI_SESSION, license_facts(channel, 5)), SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.SKIPPED,
        "multi-session",
    )


@pytest.mark.parametrize(
    "os_facts",
    [
        OsFacts("Microsoft Windows 11 Enterprise multi-session", "10.0.22631", 22631, 3, 175, "Enterprise"),
        OsFacts("Microsoft Windows 11 Enterprise multi-session", "10.0.22631", 22631, 3, 4, "ServerRdsh"),
    ],
    ids=["sku-175-only", "edition-serverrdsh-only"],
)
@pytest.mark.parametrize("channel", ["AVMA", "KMS_CLIENT"])
def test_multi_session_is_known_by_its_sku_or_its_edition_id_alone(os_facts: OsFacts, channel: str) -> None:
    """Either fact alone makes the VM multi-session: a re-key (or a KMS change) there cannot be undone."""
    decision = decide(detected(os_facts, license_facts(channel, 5)), SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.SKIPPED,
        "multi-session",
    )


def test_kms_client_licensed_is_healthy() -> None:
    decision = decide(detected(lic=license_facts("KMS_CLIENT", 1, "kms.contoso.local:1688")), SETTINGS)
    assert (decision.kind, decision.reason) == (OutcomeKind.HEALTHY, "kms-client-licensed")


@pytest.mark.parametrize(
    "host", [None, "", "azkms.core.windows.net", "kms.core.windows.net:1688", "20.118.99.224"]
)
def test_kms_client_unlicensed_on_no_host_or_the_azure_kms_is_repaired(host: str | None) -> None:
    decision = decide(detected(lic=license_facts("KMS_CLIENT", 5, host)), SETTINGS)
    assert (decision.action, decision.reason) == (Action.REPAIR, "kms-client-unlicensed")
    assert decision.entry is None  # a repair never installs a key


def test_kms_client_unlicensed_on_a_custom_host_is_left_alone_unless_overriding_is_allowed() -> None:
    guest = detected(lic=license_facts("KMS_CLIENT", 0, "kms.contoso.local:1688"))
    assert (decide(guest, SETTINGS).kind, decide(guest, SETTINGS).reason) == (
        OutcomeKind.SKIPPED,
        "custom-kms",
    )
    assert decide(guest, OVERRIDE).action is Action.REPAIR
    # a custom KMS found through DNS auto-discovery counts too
    discovered = detected(lic=license_facts("KMS_CLIENT", 0, None, "kms.corp.example"))
    assert decide(discovered, SETTINGS).reason == "custom-kms"


def test_custom_kms_is_judged_against_the_configured_cloud() -> None:
    gov = Settings.from_env({"AZURE_CLOUD": "AzureUSGovernment"})
    guest = detected(lic=license_facts("KMS_CLIENT", 0, "azkms.core.windows.net"))
    assert decide(guest, gov).reason == "custom-kms"
    assert (
        decide(detected(lic=license_facts("KMS_CLIENT", 0, "kms.core.usgovcloudapi.net")), gov).action
        is Action.REPAIR
    )


@pytest.mark.parametrize(("channel", "word"), [("RETAIL", "retail"), ("MAK", "mak"), ("OEM", "oem")])
def test_retail_mak_and_oem_are_never_touched(channel: str, word: str) -> None:
    unlicensed = decide(detected(lic=license_facts(channel, 0)), SETTINGS)
    assert (unlicensed.action, unlicensed.kind, unlicensed.reason) == (
        Action.NONE,
        OutcomeKind.SKIPPED,
        f"channel-{word}",
    )
    licensed = decide(detected(lic=license_facts(channel, 1)), SETTINGS)
    assert (licensed.action, licensed.kind, licensed.reason) == (
        Action.NONE,
        OutcomeKind.HEALTHY,
        f"{word}-licensed",
    )


def test_unknown_channel_and_no_product_key_are_not_touched() -> None:
    assert decide(detected(lic=license_facts("TIMEBASED", 2)), SETTINGS).reason == "unknown-channel"
    no_key = detected()
    no_key = type(no_key)(script="detect", os=no_key.os, license=None, kms_probe=no_key.kms_probe)
    assert decide(no_key, SETTINGS).reason == "no-product-key"


def test_a_detection_script_error_fails_without_action() -> None:
    guest = detected(error=ScriptError("read-license", "0x80041010", "Invalid class"))
    decision = decide(guest, SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.FAILED,
        "detection-error",
    )


GUARD_LINE = (
    'AVMA-REMEDIATOR-RESULT {"schema":2,"script":"%s","os":null,"license":null,"kmsProbe":null,'
    '"attestation":null,"steps":[],"error":{"step":"powershell-version","hresult":"0x80070032",'
    '"message":"Windows PowerShell 2.0 is older than 3.0"}}'
)


def test_an_old_windows_powershell_fails_with_its_own_reason_and_the_wmf_hint() -> None:
    guest = parse_result(GUARD_LINE % "detect", expected_script="detect")
    decision = decide(guest, SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.FAILED,
        "powershell-version",
    )
    hint = hint_for("powershell-version", SETTINGS)
    assert "WMF 5.1" in hint and "Run Command does not officially support" in hint
    after = parse_result(GUARD_LINE % "remediate", expected_script="remediate")
    assert judge(after) == (OutcomeKind.FAILED, "powershell-version")


def test_a_result_that_could_not_be_written_is_a_detection_or_remediation_error() -> None:
    write_failed = ScriptError("write-result", "0x80004005", "the result line could not be built")
    decision = decide(detected(error=write_failed), SETTINGS)
    assert (decision.kind, decision.reason) == (OutcomeKind.FAILED, "detection-error")
    assert "write-result" in hint_for("detection-error", SETTINGS)
    after = remediated([])
    after = type(after)("remediate", None, None, None, (), write_failed)
    assert judge(after) == (OutcomeKind.FAILED, "remediation-error:0x80004005")


OK = "0x00000000"
ALL_STEPS = ["install-key", "clear-kms-cache", "set-kms-host", "set-kms-port", "refresh", "activate"]


def test_judge_remediated_only_when_licensed_on_the_kms_channel() -> None:
    assert judge(remediated([(s, OK) for s in ALL_STEPS])) == (OutcomeKind.REMEDIATED, "")
    assert judge(remediated([(s, OK) for s in ALL_STEPS], status=5)) == (
        OutcomeKind.FAILED,
        "verify-failed:license-status-5",
    )
    assert (
        judge(remediated([(s, OK) for s in ALL_STEPS], channel="AVMA"))[1] == "verify-failed:not-kms-client"
    )


def test_judge_names_the_failing_step_and_its_hresult() -> None:
    steps = [(s, OK) for s in ALL_STEPS[:-1]] + [("activate", "0xC004F074")]
    assert judge(remediated(steps, status=5)) == (OutcomeKind.FAILED, "activation-error:0xC004F074")
    assert judge(remediated([("install-key", "0xC004F069")], channel="AVMA", status=5)) == (
        OutcomeKind.FAILED,
        "key-install-error:0xC004F069",
    )
    assert judge(remediated([("install-key", OK), ("clear-kms-cache", "0x80070005")]))[1] == (
        "step-error:clear-kms-cache:0x80070005"
    )
    assert judge(remediated([("install-key", OK)]))[1] == "activation-not-attempted"


KMS_LICENSED = license_facts("KMS_CLIENT", 1, "azkms.core.windows.net:1688")


@pytest.mark.parametrize(
    ("attestation", "kind", "reason"),
    [
        (ATTESTED, OutcomeKind.HEALTHY, "kms-client-licensed"),
        (NO_IMDS, OutcomeKind.FAILED, "attestation-imds-unreachable"),
        (BAD_CHAIN, OutcomeKind.FAILED, "attestation-chain-invalid"),
        # reached but no chain verdict (the parser refuses it; the judgement must not pass it either)
        (AttestationFacts(True, None, None), OutcomeKind.FAILED, "attestation-chain-invalid"),
        (None, OutcomeKind.FAILED, "attestation-not-reported"),
    ],
)
def test_a_licensed_azure_edition_kms_client_is_healthy_only_when_its_attestation_passes(
    attestation: AttestationFacts | None, kind: OutcomeKind, reason: str
) -> None:
    guest = detected(AZURE_EDITION_2022, KMS_LICENSED, attestation=attestation)
    decision = decide(guest, SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (Action.NONE, kind, reason)
    # other editions report no attestation and need none
    assert decide(detected(lic=KMS_LICENSED), SETTINGS).kind is OutcomeKind.HEALTHY


@pytest.mark.parametrize(("edition_id", "sku"), [("ServerTurbineCor", 408), ("ServerTurbineCor", 409)])
def test_azure_edition_server_core_needs_the_attestation_too(edition_id: str, sku: int) -> None:
    core = OsFacts(
        "Microsoft Windows Server 2022 Datacenter: Azure Edition", "10.0.20348", 20348, 3, sku, edition_id
    )
    assert (
        decide(detected(core, KMS_LICENSED, attestation=NO_IMDS), SETTINGS).reason
        == "attestation-imds-unreachable"
    )
    assert decide(detected(core, KMS_LICENSED, attestation=ATTESTED), SETTINGS).kind is OutcomeKind.HEALTHY
    after = remediated([("activate", "0x00000000")], os_facts=core, attestation=BAD_CHAIN)
    assert judge(after) == (OutcomeKind.FAILED, "attestation-chain-invalid")


@pytest.mark.parametrize(
    ("edition_id", "azure"),
    [
        ("ServerTurbine", True),
        ("ServerTurbineCor", True),
        ("serverturbine", True),  # public SKU lists print it lower-case
        ("SERVERTURBINECOR", True),
        ("ServerDatacenter", False),
        ("ServerTurbin", False),
        ("Server Turbine", False),
        ("", False),
        ("\u017ferverTurbine", False),  # long s: casefold says serverturbine, the scripts' rule need not
        ("ServerTur\u0131ne", False),  # dotless i
        ("ServerTurb\u0130ne", False),
    ],
)
def test_azure_edition_is_an_ascii_case_insensitive_prefix_as_in_the_scripts(
    edition_id: str, azure: bool
) -> None:
    facts = OsFacts(
        "Microsoft Windows Server 2022 Datacenter: Azure Edition", "10.0.20348", 20348, 3, 407, edition_id
    )
    assert is_azure_edition(facts) is azure
    reason = decide(detected(facts, KMS_LICENSED, attestation=None), SETTINGS).reason
    assert reason == ("attestation-not-reported" if azure else "kms-client-licensed")


def test_attestation_hints_carry_the_documented_fix() -> None:
    imds = hint_for("attestation-imds-unreachable", SETTINGS)
    assert "169.254.169.254" in imds and "proxies" in imds and "route print" in imds
    chain = hint_for("attestation-chain-invalid", SETTINGS)
    assert "KB5036909" in chain and "fclip.exe" in chain and "Local Machine" in chain
    assert "never counted as healthy" in hint_for("attestation-not-reported", SETTINGS)


def test_an_avma_azure_edition_vm_is_rekeyed_whatever_its_attestation() -> None:
    """The KMS activation is needed either way; the attestation is judged after it."""
    for attestation in (ATTESTED, NO_IMDS, BAD_CHAIN, None):
        decision = decide(detected(AZURE_EDITION_2022, attestation=attestation), SETTINGS)
        assert decision.action is Action.REKEY
        assert decision.entry is not None and decision.entry.product_key == "NTBV8-9K7Q8-V27C6-M2BTV-KHMXV"


@pytest.mark.parametrize(
    ("attestation", "verdict"),
    [
        (ATTESTED, (OutcomeKind.REMEDIATED, "")),
        (NO_IMDS, (OutcomeKind.FAILED, "attestation-imds-unreachable")),
        (BAD_CHAIN, (OutcomeKind.FAILED, "attestation-chain-invalid")),
        (None, (OutcomeKind.FAILED, "attestation-not-reported")),
    ],
)
def test_judge_never_says_remediated_on_azure_edition_when_the_attestation_fails(
    attestation: AttestationFacts | None, verdict: tuple[OutcomeKind, str]
) -> None:
    after = remediated([(s, OK) for s in ALL_STEPS], os_facts=AZURE_EDITION_2022, attestation=attestation)
    assert judge(after) == verdict


# attestation.error as the scripts write it when IMDS answers with an HTTP error (Test-Attestation)
HTTP_503 = "HTTP 503: WebException: The remote server returned an error: (503) Server Unavailable."


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (HTTP_503, "attestation-imds-http:503"),
        (
            "HTTP 429: WebException: The remote server returned an error: (429) Too Many Requests.",
            "attestation-imds-http:429",
        ),
        (
            "HTTP 404: WebException: The remote server returned an error: (404) Not Found.",
            "attestation-imds-http:404",
        ),
        # anything else is "not reached", even when HTTP is mentioned further in
        ("WebException: The operation has timed out", "attestation-imds-unreachable"),
        ("WebException: Unable to connect to the remote server", "attestation-imds-unreachable"),
        ("WebException: HTTP 503: not at the start", "attestation-imds-unreachable"),
        ("HTTP 5031: four digits", "attestation-imds-unreachable"),
        ("HTTP 503 without the colon", "attestation-imds-unreachable"),
        (None, "attestation-imds-unreachable"),
    ],
)
def test_an_imds_http_error_is_told_apart_from_an_unreachable_imds(error: str | None, reason: str) -> None:
    facts = AttestationFacts(imds_reachable=False, chain_valid=None, error=error)
    decision = decide(detected(AZURE_EDITION_2022, KMS_LICENSED, attestation=facts), SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (Action.NONE, OutcomeKind.FAILED, reason)
    after = remediated([(s, OK) for s in ALL_STEPS], os_facts=AZURE_EDITION_2022, attestation=facts)
    assert judge(after) == (OutcomeKind.FAILED, reason)


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        ("503", "retry after some time"),
        ("500", "retry after some time"),
        ("410", "70 seconds"),
        ("429", "5 requests per second"),
        ("407", "transparent proxy"),
        ("404", "file an issue"),
    ],
)
def test_the_imds_http_hint_names_the_status_and_does_not_blame_routes(status: str, advice: str) -> None:
    hint = hint_for(f"attestation-imds-http:{status}", SETTINGS)
    assert f"IMDS answered HTTP {status}" in hint
    assert advice in hint
    assert "not a proxy or route problem" in hint and "route print" not in hint
    assert "watermark" in hint
    # the unreachable hint keeps its proxy and route advice
    assert "route print" in hint_for("attestation-imds-unreachable", SETTINGS)


def test_the_hint_after_a_partial_remediation_tells_the_channel_the_vm_is_really_on() -> None:
    avma = detected()
    # the key went in, a later step failed: the VM is a KMS client now, not on its old channel
    partial = remediated([("install-key", OK), ("clear-kms-cache", "0x80070005")], status=5)
    reason = judge(partial)[1]
    assert reason == "step-error:clear-kms-cache:0x80070005"
    hint = remediation_hint(reason, SETTINGS, avma, partial)
    assert "now a KMS client (it was AVMA)" in hint and "keeps its previous channel" not in hint
    # every step passed but the verification did not: same truth
    unverified = remediated([(s, OK) for s in ALL_STEPS], status=5)
    hint = remediation_hint(judge(unverified)[1], SETTINGS, avma, unverified)
    assert "now a KMS client (it was AVMA)" in hint
    # nothing took: the channel really is the old one
    untouched = remediated([(s, OK) for s in ALL_STEPS], channel="AVMA", status=5)
    hint = remediation_hint(judge(untouched)[1], SETTINGS, avma, untouched)
    assert "keeps its previous channel (AVMA" in hint
    # the result could not be written: the state is unknown, and the hint does not guess
    lost = GuestResult("remediate", None, None, None, (), ScriptError("write-result", "0x80004005", "x"))
    hint = remediation_hint(judge(lost)[1], SETTINGS, avma, lost)
    assert "not known" in hint and "previous channel" not in hint
    # the key went in, then the facts could not be re-read: the hint still says the key is in
    unread = GuestResult(
        "remediate",
        SERVER_2022_DC,
        None,
        None,
        (Step("install-key", OK), Step("clear-kms-cache", OK)),
        ScriptError("read-license", "0x80041010", "x"),
    )
    hint = remediation_hint(judge(unread)[1], SETTINGS, avma, unread)
    assert "KMS client key was installed" in hint and "not known" not in hint
    # a repair keeps the KMS client channel, and says so
    repair_before = detected(lic=license_facts("KMS_CLIENT", 5))
    failed_repair = remediated([("clear-kms-cache", OK), ("set-kms-host", "0x80070005")], status=5)
    hint = remediation_hint(judge(failed_repair)[1], SETTINGS, repair_before, failed_repair)
    assert "keeps its previous channel (KMS_CLIENT" in hint


@pytest.mark.parametrize("value", [None, "", "Volume:AVMA", "Volume:Something-New", "Volume:GVLK"])
def test_avma_is_never_rejected_for_an_unknown_or_absent_product_key_channel(value: str | None) -> None:
    decision = decide(detected(lic=license_facts("AVMA", 5, key_channel=value)), SETTINGS)
    assert (decision.action, decision.reason) == (Action.REKEY, "avma-channel")


@pytest.mark.parametrize(
    ("channel", "status", "value"),
    [
        ("AVMA", 5, "Retail"),
        ("AVMA", 1, "OEM:DM"),
        ("AVMA", 5, "OEM:SLP"),
        ("AVMA", 5, "OEM:NONSLP"),
        ("AVMA", 5, "Volume:MAK"),
        ("AVMA", 5, "volume:csvlk"),
        ("KMS_CLIENT", 5, "Volume:MAK"),
        ("KMS_CLIENT", 0, "Retail"),
    ],
)
def test_a_product_key_channel_naming_another_channel_is_never_touched(
    channel: str, status: int, value: str
) -> None:
    decision = decide(detected(lic=license_facts(channel, status, key_channel=value)), SETTINGS)
    assert (decision.action, decision.kind, decision.reason) == (
        Action.NONE,
        OutcomeKind.SKIPPED,
        "channel-mismatch",
    )
    assert "never touched" in hint_for("channel-mismatch", SETTINGS)


def test_a_product_key_channel_that_agrees_changes_nothing() -> None:
    repair = decide(detected(lic=license_facts("KMS_CLIENT", 5, key_channel="Volume:GVLK")), SETTINGS)
    assert repair.action is Action.REPAIR
    licensed = decide(detected(lic=license_facts("KMS_CLIENT", 1, key_channel="Volume:GVLK")), SETTINGS)
    assert licensed.kind is OutcomeKind.HEALTHY
    assert (
        decide(detected(lic=license_facts("OEM", 1, key_channel="OEM:DM")), SETTINGS).reason == "oem-licensed"
    )


@pytest.mark.parametrize(
    "os_facts",
    [
        OsFacts("Microsoft Windows Server 2008 R2 Datacenter", "6.1.7601", 7601, 3, 8, "ServerDatacenter"),
        OsFacts("Microsoft Windows Server 2012 Standard", "6.2.9200", 9200, 3, 7, "ServerStandard"),
    ],
)
def test_an_avma_channel_before_2012_r2_is_impossible_and_never_rekeyed(os_facts: OsFacts) -> None:
    assert select_key(os_facts) is not None  # the catalog row exists, for the repair path
    for status in (1, 5):
        decision = decide(detected(os_facts, license_facts("AVMA", status)), SETTINGS)
        assert (decision.action, decision.kind, decision.reason) == (
            Action.NONE,
            OutcomeKind.SKIPPED,
            "avma-before-2012r2",
        )
    assert "2012 R2" in hint_for("avma-before-2012r2", SETTINGS)
    # the same VM as an unlicensed KMS client is repaired (no key is installed)
    assert decide(detected(os_facts, license_facts("KMS_CLIENT", 5)), SETTINGS).action is Action.REPAIR


def test_avma_from_2012_r2_on_is_rekeyed() -> None:
    r2 = OsFacts("Microsoft Windows Server 2012 R2 Datacenter", "6.3.9600", 9600, 3, 8, "ServerDatacenter")
    assert decide(detected(r2), SETTINGS).action is Action.REKEY
