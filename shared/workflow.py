"""The per-VM workflow: gate → detect → decide → remediate → verify, ending in one Outcome.

It is the one place where a VM is judged, shared by the CLI and the queue worker. Every path ends
in an outcome; ARM trouble becomes ``deferred`` (retry later) or ``skipped``/``failed`` with a reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared import network_diagnosis
from shared.azure.compute import (
    AgentNotReady,
    ArmTimeout,
    ArmUnavailable,
    ComputeError,
    RunCommandBusy,
    RunCommandOperationFailed,
    RunCommandTimeout,
    Throttled,
    VmNotFound,
    VmNotRunning,
)
from shared.decide import Action, Decision, decide, gate
from shared.guest.facts import GuestOutputError, GuestResult, parse_result
from shared.guest.scripts import detect_command, remediate_command
from shared.hints import hint_for, remediation_hint
from shared.model import Outcome, OutcomeKind, VmId
from shared.network_path import PathVerdict
from shared.settings import Mode, Settings
from shared.verify import judge
from shared.vm import VmFacts

log = logging.getLogger(__name__)

# Transient ARM trouble: the work item is retried later. A Run Command whose operation ended Failed
# in Azure is among them (it says nothing about the VM); output with no readable result line is too
# (``_bad_output``). Both are bounded: shared/unreadable.py.
_DEFERRING = (
    RunCommandBusy,
    Throttled,
    ArmUnavailable,
    ArmTimeout,
    RunCommandTimeout,
    AgentNotReady,
    RunCommandOperationFailed,
)

# Called before each Run Command POST with the phase ("detect" or "remediate") and what is about to
# be sent; it may raise (a lost lease, a ledger that cannot record the intent) and then nothing is POSTed.
BeforeRunCommand = Callable[[str, Mapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Recent:
    """A verdict fresh enough to skip detection when the VM's OS disk is the one it was reached on."""

    verified_at: datetime
    os_disk_id: str


class Compute(Protocol):
    """What the workflow needs from ARM (``shared.azure.compute.ComputeGateway``)."""

    async def get_vm(self, vm_id: VmId) -> VmFacts: ...

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]: ...


class Remediator:
    """Runs the workflow for one VM. It holds no state between checks: keeping two workflows off
    one VM is the ledger's lease (queue path) or the caller's de-duplication (the CLI's sweep)."""

    def __init__(
        self, compute: Compute, settings: Settings, *, network: network_diagnosis.NetworkCheck | None = None
    ) -> None:
        self._compute = compute
        self._settings = settings
        self._network = network  # the Azure-side path check (issue 11); None: the guest probe only

    @property
    def settings(self) -> Settings:
        return self._settings

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
        recent: Recent | None = None,
    ) -> Outcome:
        """Take one VM to an outcome. ``listed`` lets a sweep skip the read for VMs it can rule out;
        ``before_run_command`` is awaited before every POST (the worker renews its lease there);
        with ``recent``, a VM whose OS disk is unchanged ends ``skipped: recently-verified`` after
        its read, with no Run Command."""
        started = time.monotonic()
        outcome = await self._check(vm_id, listed, before_run_command, recent)
        outcome.details["duration_s"] = round(time.monotonic() - started, 3)
        return outcome

    async def _check(
        self,
        vm_id: VmId,
        listed: VmFacts | None,
        hook: BeforeRunCommand | None,
        recent: Recent | None,
    ) -> Outcome:
        settings = self._settings
        phase = "read"
        disk: dict[str, Any] = {}
        try:
            if listed is not None:
                early = gate(listed, settings)
                if early is not None:
                    _step(vm_id, "gate", None, "%s: %s (from the listing)", early.kind, early.reason)
                    return self._final(vm_id, early)
            began = time.monotonic()
            vm = await self._compute.get_vm(vm_id)
            disk = {"osDiskId": vm.os_disk_id} if vm.os_disk_id else {}
            ruled = gate(vm, settings)
            if ruled is not None:
                _step(vm_id, "gate", began, "%s: %s", ruled.kind, ruled.reason)
                return self._final(vm_id, ruled, dict(disk))
            _step(vm_id, "gate", began, "%s, %s, agent ready: run detection", vm.os_type, vm.power_state)
            if recent is not None and vm.os_disk_id and vm.os_disk_id.lower() == recent.os_disk_id.lower():
                return self._outcome(
                    vm_id,
                    OutcomeKind.SKIPPED,
                    "recently-verified",
                    {**disk, "verifiedAt": recent.verified_at.isoformat()},
                )

            phase = "detect"
            detect = detect_command(settings.kms_host, settings.kms_port)
            if hook is not None:
                await hook(phase, {})
            began = time.monotonic()
            detect_out, detect_err = await self._compute.run_command(vm_id, detect)
            before = self._parse(detect_out, "detect")
            if isinstance(before, Outcome):
                _step(vm_id, "detect", began, "no result line: bad-output")
                return self._bad_output(vm_id, before, detect_err)
            _step(vm_id, "detect", began, "%s", _summary(before))
            decision = decide(before, settings)
            verdict = f"{decision.kind}: {decision.reason}" if decision.kind else decision.reason
            _step(vm_id, "decision", None, "%s (%s)", decision.action, verdict)
            facts = {**disk, **_facts(before, "")}
            path: PathVerdict | None = None
            if self._network is not None and network_diagnosis.wanted(decision, before):
                path = await self._network.path(vm)
                facts.update(network_diagnosis.details(path, settings))
            if decision.action is Action.NONE:
                extra = {"error": _error_text(before)} if before.error is not None else {}
                return self._final(vm_id, decision, {**facts, **extra}, path=path)
            if decision.entry is not None:
                facts["edition"] = decision.entry.edition
            facts["kmsTarget"] = settings.kms_target
            if settings.mode is Mode.AUDIT:
                return self._outcome(
                    vm_id,
                    OutcomeKind.WOULD_REMEDIATE,
                    decision.reason,
                    facts,
                    hint=self._path_hint(path, decision.reason),
                )

            phase = "remediate"
            body = remediate_command(
                product_key=decision.entry.product_key
                if decision.action is Action.REKEY and decision.entry
                else None,
                kms_host=settings.kms_host,
                kms_port=settings.kms_port,
            )
            if hook is not None:
                await hook(phase, {"action": decision.action.value, "reason": decision.reason, **facts})
            began = time.monotonic()
            fix_out, fix_err = await self._compute.run_command(vm_id, body)
            after = self._parse(fix_out, "remediate")
            if isinstance(after, Outcome):
                _step(vm_id, "remediate", began, "no result line: bad-output")
                return self._bad_output(vm_id, after, fix_err, phase="remediate")
            _step(vm_id, "remediate", began, "%s", _summary(after))
            kind, reason = judge(after)
            _step(vm_id, "verify", None, "%s: %s", kind, reason or decision.reason)
            details = {**facts, **_facts(after, "After"), "steps": [[s.name, s.hresult] for s in after.steps]}
            details["action"] = decision.action.value
            if after.error is not None:
                details["error"] = _error_text(after)
            reason = reason or decision.reason
            hint = remediation_hint(reason, settings, before, after)
            if reason == network_diagnosis.KMS_FAILED and self._network is not None:
                if path is None:  # the probe connected, activation did not: ask Azure now
                    path = await self._network.path(vm)
                    details.update(network_diagnosis.details(path, settings))
                hint = network_diagnosis.hint(path, reason, settings, hint)
            return self._outcome(vm_id, kind, reason, details, hint=hint)
        except VmNotFound:
            return self._outcome(vm_id, OutcomeKind.SKIPPED, "not-found", {"phase": phase})
        except VmNotRunning as error:
            return self._outcome(
                vm_id, OutcomeKind.SKIPPED, "not-running", {"phase": phase, "error": str(error)}
            )
        except _DEFERRING as error:
            details = {"phase": phase, "error": str(error)}
            if error.code:
                details["code"] = error.code
            return self._outcome(vm_id, OutcomeKind.DEFERRED, error.reason, details)
        except ComputeError as error:
            return self._outcome(
                vm_id,
                OutcomeKind.FAILED,
                error.reason,
                {"phase": phase, "code": error.code, "error": str(error)},
            )

    @staticmethod
    def _parse(output: str, script: str) -> GuestResult | Outcome:
        try:
            return parse_result(output, expected_script=script)
        except GuestOutputError as error:
            return Outcome("", OutcomeKind.DEFERRED, "bad-output", details={"error": str(error)[:300]})

    def _bad_output(self, vm_id: VmId, parsed: Outcome, stderr: str, *, phase: str = "detect") -> Outcome:
        """Output with no readable result line (cut, garbled, not our script's) says nothing about the
        VM: ``deferred: bad-output``, retried. After a remediation it is not known what the script
        did, so the retry detects the VM's state before anything else (shared/unreadable.py)."""
        details = {**parsed.details, "phase": phase}
        if stderr:
            details["stderr"] = stderr[-300:]
        return self._outcome(vm_id, OutcomeKind.DEFERRED, "bad-output", details)

    def _final(
        self,
        vm_id: VmId,
        decision: Decision,
        details: dict[str, Any] | None = None,
        *,
        path: PathVerdict | None = None,
    ) -> Outcome:
        assert decision.kind is not None
        return self._outcome(
            vm_id, decision.kind, decision.reason, details, hint=self._path_hint(path, decision.reason)
        )

    def _path_hint(self, path: PathVerdict | None, reason: str) -> str | None:
        """The hint told from the Azure-side verdict, or None (the reason's own hint)."""
        if path is None:
            return None
        return network_diagnosis.hint(path, reason, self._settings, hint_for(reason, self._settings))

    def _outcome(
        self,
        vm_id: VmId,
        kind: OutcomeKind,
        reason: str,
        details: dict[str, Any] | None = None,
        *,
        hint: str | None = None,
    ) -> Outcome:
        # A would-remediate row is the plan: some need a person first (the KMS route), so their
        # reasons carry a hint; plain ones ("avma-channel") have none.
        quiet = (OutcomeKind.HEALTHY, OutcomeKind.REMEDIATED)
        if kind in quiet:
            hint = ""
        elif hint is None:
            hint = hint_for(reason, self._settings)
        outcome = Outcome(str(vm_id), kind, reason, hint, dict(details or {}))
        log.debug(
            "%s/%s: outcome: %s: %s",
            vm_id.resource_group,
            vm_id.name,
            kind.value,
            reason,
            extra={"vm_id": str(vm_id), "outcome": kind.value, "reason": reason},
        )
        return outcome


def _step(vm_id: VmId, step: str, began: float | None, text: str, *args: object) -> None:
    """One debug record per workflow step (gate, detect, decision, remediate, verify), for the CLI's
    ``-v``: the VM, the step, what it found and, for a step that called ARM, how long it took."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    took = f" ({time.monotonic() - began:.2f} s)" if began is not None else ""
    log.debug(
        "%s/%s: %s: " + text + "%s",
        vm_id.resource_group,
        vm_id.name,
        step,
        *args,
        took,
        extra={"vm_id": str(vm_id), "step": step},
    )


def _summary(result: GuestResult) -> str:
    """What a result line says, in a few words: channel, license status, KMS probe, error step."""
    parts = []
    if result.license is not None:
        parts.append(f"{result.license.channel.value} status {int(result.license.license_status)}")
    if result.kms_probe is not None:
        parts.append("KMS reachable" if result.kms_probe.reachable else "KMS unreachable")
    if result.steps:
        failing = [f"{s.name} {s.hresult}" for s in result.steps if not s.ok]
        parts.append("failing steps: " + ", ".join(failing) if failing else "every step ok")
    if result.error is not None:
        parts.append(f"error {result.error.step} {result.error.hresult}")
    return "; ".join(parts) or "no facts"


def _facts(result: GuestResult, suffix: str) -> dict[str, Any]:
    """The few guest facts worth showing next to an outcome."""
    out: dict[str, Any] = {}
    if result.os is not None and not suffix:
        out["caption"] = result.os.caption
    if result.license is not None:
        out[f"channel{suffix}"] = result.license.channel.value
        out[f"licenseStatus{suffix}"] = int(result.license.license_status)
    if result.kms_probe is not None and not suffix:
        out["kmsReachable"] = result.kms_probe.reachable
    return out


def _error_text(result: GuestResult) -> str:
    err = result.error
    return f"{err.step}: {err.hresult} {err.message}"[:300] if err else ""
