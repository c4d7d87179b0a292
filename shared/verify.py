"""Judge a remediation from what the guest reported after it: the step HRESULTs and the re-read facts."""

from __future__ import annotations

from shared.decide import attestation_problem
from shared.guest.facts import POWERSHELL_VERSION_STEP, Channel, GuestResult, LicenseStatus
from shared.model import OutcomeKind

_STEP_REASON = {"install-key": "key-install-error", "activate": "activation-error"}


def judge(after: GuestResult) -> tuple[OutcomeKind, str]:
    """``remediated`` only when every step succeeded and Windows now says Licensed on the KMS channel
    (and, on Azure Edition, the re-read attestation check passed: without it the watermark stays)."""
    if after.error is not None:
        if after.error.step == POWERSHELL_VERSION_STEP:
            return OutcomeKind.FAILED, "powershell-version"
        # incl. write-result (0x80004005): the result could not be built, so the state after the
        # steps is unknown; the hint says so (shared.hints.remediation_hint).
        return OutcomeKind.FAILED, f"remediation-error:{after.error.hresult}"
    for step in after.steps:
        if not step.ok:
            prefix = _STEP_REASON.get(step.name, f"step-error:{step.name}")
            return OutcomeKind.FAILED, f"{prefix}:{step.hresult}"
    if not any(s.name == "activate" for s in after.steps):
        return OutcomeKind.FAILED, "activation-not-attempted"
    lic = after.license
    if lic is None or lic.channel is not Channel.KMS_CLIENT:
        return OutcomeKind.FAILED, "verify-failed:not-kms-client"
    if lic.license_status != LicenseStatus.LICENSED:
        return OutcomeKind.FAILED, f"verify-failed:license-status-{int(lic.license_status)}"
    problem = attestation_problem(after)
    if problem is not None:
        return OutcomeKind.FAILED, problem
    return OutcomeKind.REMEDIATED, ""
