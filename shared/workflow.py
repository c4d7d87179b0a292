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
from shared.guessed_rekey import Expectation, before_as_result, expectation_for
from shared.guest.facts import (
    POWERSHELL_VERSION_STEP,
    BeforeFacts,
    Channel,
    GuestOutputError,
    GuestResult,
    parse_result,
)
from shared.guest.scripts import conditional_rekey_command, detect_command, remediate_command
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


# A conditional re-key that stopped at one of these changed nothing (the version guard, parameters).
_NOTHING_DONE_STEPS = frozenset({POWERSHELL_VERSION_STEP, "parameters"})
# What a re-key's hint is told of the state before it when the script could not say.
_UNKNOWN_BEFORE = GuestResult(script="detect", os=None, license=None, kms_probe=None)


class DetectFirst(Exception):
    """A before-Run-Command hook's answer to a conditional re-key: send no key yet, detect first and
    decide on that (``apply`` compares a fresh detection with its plan before any change)."""


async def detect_first(phase: str, details: Mapping[str, Any]) -> None:
    """A before-Run-Command hook that answers a conditional re-key with :class:`DetectFirst`.

    For a check whose last Run Command answer said nothing about the VM (``run-command-failed``,
    ``bad-output``; shared/unreadable.py): that command may have been the conditional re-key, which
    may have installed the key, so its retry reads the VM's state with a detection before anything
    else, and decides on that. Every other Run Command goes as usual."""
    if phase == "remediate" and details.get("conditional"):
        raise DetectFirst


@dataclass(slots=True)
class _Phase:
    """Where a check is (read, detect, remediate), for the outcome of an error that ends it."""

    name: str = "read"


@dataclass(frozen=True, slots=True)
class Recent:
    """A verdict fresh enough to skip detection when the VM's OS disk is the one it was reached on."""

    verified_at: datetime
    os_disk_id: str


class Checker(Protocol):
    """``Remediator.check`` as its wrappers offer it (the sweep, the CLI's scope check, ledger, plan and
    interrupt handling): one VM in, one outcome out, with the hook awaited before each POST."""

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome: ...


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
        step = _Phase()
        try:
            return await self._run(vm_id, listed, hook, recent, step)
        except VmNotFound:
            return self._outcome(vm_id, OutcomeKind.SKIPPED, "not-found", {"phase": step.name})
        except VmNotRunning as error:
            return self._outcome(
                vm_id, OutcomeKind.SKIPPED, "not-running", {"phase": step.name, "error": str(error)}
            )
        except _DEFERRING as error:
            details: dict[str, Any] = {"phase": step.name, "error": str(error)}
            if error.code:
                details["code"] = error.code
            if error.retry_after_s is not None:
                details["retryAfterS"] = error.retry_after_s  # the retry comes no sooner (worker)
            return self._outcome(vm_id, OutcomeKind.DEFERRED, error.reason, details)
        except ComputeError as error:
            return self._outcome(
                vm_id,
                OutcomeKind.FAILED,
                error.reason,
                {"phase": step.name, "code": error.code, "error": str(error)},
            )

    async def _run(
        self,
        vm_id: VmId,
        listed: VmFacts | None,
        hook: BeforeRunCommand | None,
        recent: Recent | None,
        step: _Phase,
    ) -> Outcome:
        settings = self._settings
        if listed is not None:
            early = gate(listed, settings)
            if early is not None:
                _step(vm_id, "gate", None, "%s: %s (from the listing)", early.kind, early.reason)
                return self._final(vm_id, early)
        began = time.monotonic()
        vm = await self._compute.get_vm(vm_id)
        disk: dict[str, Any] = {"osDiskId": vm.os_disk_id} if vm.os_disk_id else {}
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

        expectation = expectation_for(vm, settings)
        if expectation is not None:
            # ARM names one catalog edition: the first Run Command may re-key, on conditions.
            step.name = "remediate"
            first = await self._conditional_rekey(vm_id, vm, expectation, disk, hook)
            if isinstance(first, Outcome):
                return first
            if first is not None:
                outcome = await self._decide_and_act(vm_id, vm, first, disk, hook, step)
                pre = first.preconditions
                outcome.details["conditionalRekey"] = {
                    "edition": expectation.entry.edition,
                    "met": False,
                    "failed": list(pre.failed) if pre is not None else [],
                }
                return outcome

        step.name = "detect"
        detect = detect_command(settings.kms_host, settings.kms_port)
        if hook is not None:
            await hook(step.name, {})
        began = time.monotonic()
        detect_out, detect_err = await self._compute.run_command(vm_id, detect)
        before = self._parse(detect_out, "detect")
        if isinstance(before, Outcome):
            _step(vm_id, "detect", began, "no result line: bad-output")
            return self._bad_output(vm_id, before, detect_err)
        _step(vm_id, "detect", began, "%s", _summary(before))
        return await self._decide_and_act(vm_id, vm, before, disk, hook, step)

    async def _decide_and_act(
        self,
        vm_id: VmId,
        vm: VmFacts,
        before: GuestResult,
        disk: dict[str, Any],
        hook: BeforeRunCommand | None,
        step: _Phase,
    ) -> Outcome:
        """Decide on detected facts (shared.decide) and, when the table says so, remediate and verify."""
        settings = self._settings
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

        step.name = "remediate"
        body = remediate_command(
            product_key=decision.entry.product_key
            if decision.action is Action.REKEY and decision.entry
            else None,
            kms_host=settings.kms_host,
            kms_port=settings.kms_port,
        )
        if hook is not None:
            await hook(step.name, {"action": decision.action.value, "reason": decision.reason, **facts})
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

    async def _conditional_rekey(
        self,
        vm_id: VmId,
        vm: VmFacts,
        expectation: Expectation,
        disk: dict[str, Any],
        hook: BeforeRunCommand | None,
    ) -> Outcome | GuestResult | None:
        """The first Run Command as a conditional re-key (shared.guessed_rekey).

        Gives the facts to decide on when the script changed nothing (its preconditions were not
        met, or it stopped before reading them: the version guard, bad parameters), else the outcome
        of the re-key, judged from the facts it read again afterwards as any remediation is; None,
        with nothing sent, when the hook answers :class:`DetectFirst`.
        """
        settings = self._settings
        entry = expectation.entry
        body = conditional_rekey_command(
            product_key=entry.product_key,
            kms_host=settings.kms_host,
            kms_port=settings.kms_port,
            channel_token=expectation.channel_token,
            edition_ids=expectation.edition_ids,
            skus=expectation.skus,
            build=expectation.build,
            product_types=expectation.product_types,
            refused_key_channels=expectation.refused_key_channels,
        )
        facts: dict[str, Any] = {**disk, "edition": entry.edition, "kmsTarget": settings.kms_target}
        _step(
            vm_id,
            "decision",
            None,
            "conditional rekey (avma-channel), if the guest shows %s's facts",
            entry.edition,
        )
        if hook is not None:
            # The intent goes on record before this POST: it may change the VM.
            intent = {"action": Action.REKEY.value, "reason": "avma-channel", "conditional": True, **facts}
            try:
                await hook("remediate", intent)
            except DetectFirst:
                return None
        began = time.monotonic()
        out, err = await self._compute.run_command(vm_id, body)
        result = self._parse(out, "remediate")
        if isinstance(result, Outcome):
            _step(vm_id, "rekey-if", began, "no result line: bad-output")
            return self._bad_output(vm_id, result, err, phase="remediate")
        pre = result.preconditions
        stopped_early = result.error is not None and result.error.step in _NOTHING_DONE_STEPS
        if (pre is not None and not pre.met) or (pre is None and stopped_early):
            unmet = ", ".join(pre.failed) if pre is not None else "stopped early"
            _step(vm_id, "rekey-if", began, "%s; changed nothing (%s)", _summary(result), unmet)
            return result
        _step(vm_id, "rekey-if", began, "%s", _summary(result))
        before = _UNKNOWN_BEFORE
        if pre is not None and pre.before is not None:
            if not expectation.accepts(pre.before):
                # The script says it acted on facts it was told not to act on: never trusted.
                problem = "the script re-keyed on facts outside the preconditions it was given"
                details = {**facts, "phase": "remediate", "error": problem, "before": _before(pre.before)}
                return self._outcome(vm_id, OutcomeKind.FAILED, "bad-output", details)
            before = before_as_result(pre.before)
            facts.update(
                channel=Channel.AVMA.value,
                licenseStatus=int(pre.before.license_status),
                kmsReachable=pre.before.kms_reachable,
            )
        if result.os is not None:
            facts["caption"] = result.os.caption
        kind, reason = judge(result)
        _step(vm_id, "verify", None, "%s: %s", kind, reason or "avma-channel")
        details = {**facts, **_facts(result, "After"), "steps": [[s.name, s.hresult] for s in result.steps]}
        details["action"] = Action.REKEY.value
        details["conditionalRekey"] = {"edition": entry.edition, "met": pre is not None and pre.met}
        if result.error is not None:
            details["error"] = _error_text(result)
        reason = reason or "avma-channel"
        hint = remediation_hint(reason, settings, before, result)
        if reason == network_diagnosis.KMS_FAILED and self._network is not None:
            path = await self._network.path(vm)  # the probe connected, activation did not: ask Azure
            details.update(network_diagnosis.details(path, settings))
            hint = network_diagnosis.hint(path, reason, settings, hint)
        return self._outcome(vm_id, kind, reason, details, hint=hint)

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


def _before(before: BeforeFacts) -> dict[str, Any]:
    return {
        "editionId": before.edition_id,
        "sku": before.sku,
        "build": before.build,
        "productType": before.product_type,
        "productKeyChannel": before.product_key_channel,
        "licenseStatus": int(before.license_status),
        "kmsReachable": before.kms_reachable,
    }


def _error_text(result: GuestResult) -> str:
    err = result.error
    return f"{err.step}: {err.hresult} {err.message}"[:300] if err else ""
