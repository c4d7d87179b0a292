"""The guest's probe and the Azure-side verdict together (issue 11, items 3 and 4).

When the guest cannot reach the KMS (its probe failed, or activation answered 0xC004F074) and the
VM needs a fix (or is kept from one: ``kms-unreachable``), the workflow asks ARM about the path
(shared/azure/network.py) and this module says what the two mean together:

| guest probe | Azure verdict | said |
| --- | --- | --- |
| unreachable | blocked | the Azure cause, the resource at fault, the exact fix (``kmsCause: azure``) |
| unreachable | ok | a cause inside the guest: Windows Firewall, a proxy, DNS (``kmsCause: in-guest``) |
| unreachable | unknown | what could not be read; the generic route hint stays |

A VM whose probe connects is not checked: a TCP connection to the KMS proves the path, and the
check would cost ARM requests and prove nothing more.
"""

from __future__ import annotations

from typing import Any, Protocol

from shared.decide import Action, Decision
from shared.guest.facts import GuestResult
from shared.kms_endpoints import kms_of
from shared.network_fix import fix_for
from shared.network_path import BLOCKED, OK, PathVerdict
from shared.settings import Settings
from shared.vm import VmFacts

KMS_FAILED = "activation-error:0xC004F074"

# What the reason means for the VM while the path is blocked, before the cause and its fix.
_LEADS = {
    "kms-unreachable": (
        "Still activated through AVMA, so the re-key waits (it is retried) until the path works."
    ),
    "avma-licensed-kms-unreachable": (
        "Still activated through AVMA: --apply would not re-key it yet (deferred: kms-unreachable)."
    ),
    "avma-kms-unreachable": (
        "Not activated: --apply would install the KMS client key, and activation would fail with "
        "0xC004F074 until the path works; then Windows activates on its own."
    ),
    KMS_FAILED: "The KMS client key is installed: once the path works, Windows activates on its own.",
}
_DEFAULT_LEAD = "Activation fails with 0xC004F074 until the path works."


class NetworkCheck(Protocol):
    """What the workflow needs from the network adapter (``shared.azure.network.NetworkGateway``)."""

    async def path(self, vm: VmFacts) -> PathVerdict: ...


def probe_failed(guest: GuestResult) -> bool:
    return guest.kms_probe is not None and not guest.kms_probe.reachable


def wanted(decision: Decision, guest: GuestResult) -> bool:
    """Whether the path is worth checking: the VM needs a fix (or waits for one) and its probe failed."""
    needs = decision.action is not Action.NONE or decision.reason == "kms-unreachable"
    return needs and probe_failed(guest)


def details(verdict: PathVerdict, settings: Settings) -> dict[str, Any]:
    """``kmsPath`` (the verdict, each finding with its fix) and ``kmsCause`` when it is known."""
    kms = kms_of(settings.cloud.name)
    path = verdict.as_details()
    if verdict.findings:
        path["findings"] = [{**f.as_dict(), "fix": fix_for(f, kms)} for f in verdict.findings]
    out: dict[str, Any] = {"kmsPath": path}
    if verdict.state == BLOCKED:
        out["kmsCause"] = "azure"
    elif verdict.state == OK:
        out["kmsCause"] = "in-guest"
    return out


def hint(verdict: PathVerdict, reason: str, settings: Settings, fallback: str) -> str:
    """The hint for a VM whose KMS failed, told from the verdict (``fallback`` when it is unknown)."""
    if verdict.state == BLOCKED:
        kms = kms_of(settings.cloud.name)
        causes = " ".join(
            f"{f.text[0].upper()}{f.text[1:]}. Fix: {'; '.join(fix_for(f, kms))}." for f in verdict.findings
        )
        return f"{_LEADS.get(reason, _DEFAULT_LEAD)} Azure shows why: {causes}"
    if verdict.state == OK:
        host = settings.kms_host
        return (
            f"Azure's side of the path is clear (every KMS address routes to Internet, outbound by "
            f"{verdict.outbound}), yet the guest cannot connect to {settings.kms_target}: the cause is "
            f"inside the guest. Check the Windows Firewall's outbound rules, a proxy, and that {host} "
            f"resolves (on the VM: Test-NetConnection {host} -Port {settings.kms_port}). "
            f"{_LEADS.get(reason, _DEFAULT_LEAD)}"
        )
    return fallback
