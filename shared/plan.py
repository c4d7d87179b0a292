"""Plan, then apply: ``sweep --out-plan FILE`` records what an audit found; ``apply FILE`` acts on it.

A plan holds, for each VM the audit saw, its audit outcome and the planned action (``rekey``,
``repair`` or ``none``); for a VM with an action, the facts it was decided on: the VM's ARM facts
and detection's result line exactly as the guest wrote it. It also holds the settings the decision
table read (cloud, KMS host and port, opt-out tag, custom-KMS override) and the scope it was made
in. The format is versioned JSON (``"kind": "avma-remediator-plan"``, ``"version": 1``; docs/plan.md).

``apply`` acts only on the plan's VMs with an action. For each it reads the VM and runs detection
again, and lets the decision table judge the fresh facts (``shared.decide``: ``gate`` on the ARM
facts, ``decide`` on the guest's); it remediates only where that decision is the plan's, the
decision table's answer on the plan's own facts (action, reason and catalog entry, compared as
``Decision`` values). Anything else ends ``skipped: plan-changed`` with what changed, before any
change to the VM. Both decisions are made in audit mode, so that the rows whose answer depends on
the mode compare alike; the remediation itself runs in enforce mode, whose own rules still apply
(a Licensed AVMA VM whose KMS is unreachable is deferred, never re-keyed).

A plan is refused (exit 2) when it is malformed, when a VM's recorded action is not what the
decision table gives on its recorded facts (an edited file, or another version of the table),
when it was made for another cloud, scope, simulator or settings, and when it is stale: older
than ``PLAN_MAX_AGE`` (24 hours: a reviewed plan is applied the same day, and a VM's facts drift;
the apply re-detects anyway, so the bound is about the review, not safety) or dated in the future.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from shared.decide import Action, Decision, decide, gate
from shared.guest.facts import RESULT_MARKER, GuestOutputError, GuestResult, channel_of, parse_result
from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId, parse_time
from shared.settings import Mode, Settings
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, Checker, Compute, DetectFirst

PLAN_KIND = "avma-remediator-plan"
PLAN_VERSION = 1
PLAN_MAX_AGE = timedelta(hours=24)
CLOCK_SKEW = timedelta(minutes=5)
PLAN_CHANGED = "plan-changed"
PLAN_CHANGED_HINT = (
    "The VM's facts changed since the plan was made, and the decision table now decides otherwise; "
    "nothing was changed. Review it again: avma-remediator sweep --out-plan FILE, then apply FILE."
)


class PlanError(ValueError):
    """The plan file cannot be applied: the message says why (exit 2)."""


class PlanChanged(Exception):
    """Raised before the remediation's Run Command when the fresh decision is not the plan's."""

    def __init__(self, now: Decision | None) -> None:
        super().__init__(now.reason if now is not None else "not judged")
        self.now = now


def decision_settings(settings: Settings) -> dict[str, Any]:
    """The settings the decision table reads, as the plan records them."""
    return {
        "cloud": settings.cloud.name,
        "kmsHost": settings.kms_host,
        "kmsPort": settings.kms_port,
        "optOutTag": settings.opt_out_tag,
        "allowCustomKmsOverride": settings.allow_custom_kms_override,
    }


def plan_scope(settings: Settings) -> dict[str, Any]:
    """The configured scope (``MANAGEMENT_GROUP_ID``, else ``TARGET_SUBSCRIPTIONS``)."""
    return {
        "managementGroup": settings.management_group or None,
        "subscriptions": sorted(s.lower() for s in settings.subscriptions),
    }


def vm_facts_document(vm: VmFacts) -> dict[str, Any]:
    return {
        "osType": vm.os_type,
        "powerState": vm.power_state,
        "agentReady": vm.agent_ready,
        "tags": dict(vm.tags),
        "osDiskId": vm.os_disk_id,
    }


def _vm_facts(vm_id: VmId, data: object, where: str) -> VmFacts:
    if not isinstance(data, dict):
        raise PlanError(f"{where}: 'vm' must be an object")
    keys = {"osType", "powerState", "agentReady", "tags", "osDiskId"}
    if set(data) != keys:
        raise PlanError(f"{where}: 'vm' must have exactly the keys {', '.join(sorted(keys))}")
    tags = data["tags"]
    strings = isinstance(tags, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    )
    if not strings:
        raise PlanError(f"{where}: vm.tags must map strings to strings")
    for key in ("osType", "powerState"):
        if data[key] is not None and not isinstance(data[key], str):
            raise PlanError(f"{where}: vm.{key} must be a string or null")
    if data["agentReady"] is not None and not isinstance(data["agentReady"], bool):
        raise PlanError(f"{where}: vm.agentReady must be true, false or null")
    if not isinstance(data["osDiskId"], str):
        raise PlanError(f"{where}: vm.osDiskId must be a string")
    return VmFacts(vm_id, data["osType"], data["powerState"], data["agentReady"], tags, "", data["osDiskId"])


def result_document(stdout: str) -> dict[str, Any] | None:
    """Detection's result line as the guest wrote it (the JSON after the marker), or None when
    ``stdout`` holds no valid detection result."""
    try:
        parse_result(stdout, expected_script="detect")
    except GuestOutputError:
        return None
    line = [raw.rstrip("\r") for raw in stdout.split("\n") if raw.startswith(RESULT_MARKER)][-1]
    document = json.loads(line[len(RESULT_MARKER) :])
    return document if isinstance(document, dict) else None


def parse_document(document: Mapping[str, Any]) -> GuestResult:
    """A recorded result line back to facts, checked as strictly as a fresh one."""
    return parse_result(RESULT_MARKER + json.dumps(document), expected_script="detect")


def judge(vm: VmFacts, guest: GuestResult, settings: Settings) -> Decision:
    """The decision table on these facts, in audit mode: ``gate`` first, then ``decide``."""
    audit = settings.with_mode(Mode.AUDIT)
    return gate(vm, audit) or decide(guest, audit)


class Recorder:
    """The ARM gateway, recording per VM what the workflow read (the VM) and what detection said,
    so that a plan can hold the facts each decision was made on, and an apply can judge afresh."""

    def __init__(self, inner: Compute) -> None:
        self._inner = inner
        self._vms: dict[VmId, VmFacts] = {}
        self._guests: dict[VmId, dict[str, Any]] = {}

    async def get_vm(self, vm_id: VmId) -> VmFacts:
        vm = await self._inner.get_vm(vm_id)
        self._vms[vm_id] = vm
        return vm

    async def run_command(self, vm_id: VmId, body: Mapping[str, Any]) -> tuple[str, str]:
        out, err = await self._inner.run_command(vm_id, body)
        document = result_document(out)
        if document is not None:
            self._guests[vm_id] = document
        return out, err

    def forget(self, vm_id: VmId) -> None:
        self._vms.pop(vm_id, None)
        self._guests.pop(vm_id, None)

    def vm(self, vm_id: VmId) -> VmFacts | None:
        return self._vms.get(vm_id)

    def guest(self, vm_id: VmId) -> dict[str, Any] | None:
        return self._guests.get(vm_id)


@dataclass(frozen=True)
class PlannedVm:
    vm_id: VmId
    outcome: Outcome  # the audit's
    action: Action
    vm: VmFacts | None = None  # the facts decided on (a VM with an action only)
    guest: Mapping[str, Any] | None = None
    decision: Decision | None = None  # the decision table's answer on those facts

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.vm_id),
            "action": self.action.value,
            "outcome": self.outcome.kind.value,
            "reason": self.outcome.reason,
        }
        if self.outcome.hint:
            out["hint"] = self.outcome.hint
        facts = {k: v for k, v in self.outcome.details.items() if k != "duration_s"}
        if facts:
            out["facts"] = facts
        if self.vm is not None:
            out["vm"] = vm_facts_document(self.vm)
        if self.guest is not None:
            out["guest"] = dict(self.guest)
        return out


@dataclass
class Plan:
    created_at: datetime
    settings: dict[str, Any]
    scope: dict[str, Any]
    simulated: bool
    vms: list[PlannedVm] = field(default_factory=list)
    interrupted: bool = False
    _index: dict[VmId, PlannedVm] = field(default_factory=dict, repr=False, compare=False)

    @property
    def actionable(self) -> list[PlannedVm]:
        return [p for p in self.vms if p.action is not Action.NONE]

    def counts(self) -> dict[str, int]:
        """VMs per planned action, the actions first (``rekey``, ``repair``), then ``none``."""
        counted = Counter(p.action for p in self.vms)
        return {a.value: counted[a] for a in (Action.REKEY, Action.REPAIR, Action.NONE) if counted[a]}

    def get(self, vm_id: VmId) -> PlannedVm | None:
        if len(self._index) != len(self.vms):
            self._index = {p.vm_id: p for p in self.vms}
        return self._index.get(vm_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PLAN_KIND,
            "version": PLAN_VERSION,
            "createdAt": self.created_at.astimezone(UTC).isoformat(),
            "simulated": self.simulated,
            "settings": self.settings,
            "scope": self.scope,
            "interrupted": self.interrupted,
            "counts": self.counts(),
            "vms": [p.to_dict() for p in self.vms],
        }

    def write(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def build_plan(
    outcomes: Sequence[Outcome],
    recorder: Recorder,
    settings: Settings,
    *,
    simulated: bool,
    interrupted: bool = False,
    now: datetime | None = None,
) -> Plan:
    """The plan of an audit: each VM's outcome, and for each ``would-remediate`` VM its action and
    the facts the decision table decided it on (read back from ``recorder``)."""
    plan = Plan(
        created_at=now or datetime.now(UTC),
        settings=decision_settings(settings),
        scope=plan_scope(settings),
        simulated=simulated,
        interrupted=interrupted,
    )
    for outcome in sorted(outcomes, key=lambda o: o.vm_id.lower()):
        vm_id = VmId.try_parse(outcome.vm_id)
        if vm_id is None:
            continue  # "computer:NAME" not found: nothing to plan
        vm, document = recorder.vm(vm_id), recorder.guest(vm_id)
        if outcome.kind is not OutcomeKind.WOULD_REMEDIATE or vm is None or document is None:
            plan.vms.append(PlannedVm(vm_id, outcome, Action.NONE))
            continue
        decision = judge(vm, parse_document(document), settings)
        plan.vms.append(PlannedVm(vm_id, outcome, decision.action, vm, document, decision))
    return plan


def load_plan(path: str, settings: Settings, *, simulated: bool, now: datetime | None = None) -> Plan:
    """Read and check a plan file against this run: every problem is a :class:`PlanError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PlanError(f"cannot read {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise PlanError(f"{path} is not JSON: {error.msg} ({where})") from None
    except RecursionError:
        raise PlanError(f"{path} is nested too deeply to be a plan") from None
    return plan_from_dict(data, settings, simulated=simulated, now=now or datetime.now(UTC), name=path)


def plan_from_dict(
    data: object, settings: Settings, *, simulated: bool, now: datetime, name: str = "the plan"
) -> Plan:
    if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
        raise PlanError(f'{name} is not an avma-remediator plan (no "kind": "{PLAN_KIND}")')
    if data.get("version") != PLAN_VERSION:
        raise PlanError(
            f"{name}: plan version {str(data.get('version'))[:20]} is not supported (this version reads "
            f"{PLAN_VERSION}); make a new plan"
        )
    stamp = data.get("createdAt")
    created = parse_time(stamp) if isinstance(stamp, str) else None
    if created is None:
        raise PlanError(f"{name}: createdAt must be an ISO 8601 time")
    if created > now + CLOCK_SKEW:
        raise PlanError(f"{name} is dated {created.isoformat()}, in the future: check this machine's clock")
    age = now - created
    if age > PLAN_MAX_AGE:
        hours, bound = age.total_seconds() / 3600, PLAN_MAX_AGE.total_seconds() / 3600
        raise PlanError(
            f"{name} is stale: made {hours:.0f} h ago, more than {bound:.0f} h; "
            "make a new plan (sweep --out-plan FILE) and review it"
        )
    if data.get("simulated") is not simulated:
        made = "on the simulator" if data.get("simulated") else "on Azure"
        raise PlanError(f"{name} was made {made}; this run is {'simulated' if simulated else 'on Azure'}")
    recorded = data.get("settings")
    current = decision_settings(settings)
    if not isinstance(recorded, dict):
        raise PlanError(f"{name}: 'settings' must be an object")
    if recorded.get("cloud") != current["cloud"]:
        raise PlanError(
            f"{name} was made for cloud {str(recorded.get('cloud'))[:40]!r}; this run's AZURE_CLOUD is "
            f"{current['cloud']}"
        )
    differ = [k for k in current if recorded.get(k) != current[k]]
    if differ or set(recorded) != set(current):
        shown = ", ".join(f"{k} {recorded.get(k)!r} → {current.get(k)!r}" for k in differ) or "unknown keys"
        raise PlanError(f"{name} was decided with other settings ({shown}); make a new plan")
    scope = data.get("scope")
    if scope != plan_scope(settings):
        raise PlanError(
            f"{name} was made for another scope ({_describe_scope(scope)}); this run's scope is "
            f"{_describe_scope(plan_scope(settings))}"
        )
    interrupted = data.get("interrupted", False)
    if not isinstance(interrupted, bool):
        raise PlanError(f"{name}: 'interrupted' must be true or false")
    rows = data.get("vms")
    if not isinstance(rows, list):
        raise PlanError(f"{name}: 'vms' must be a list")
    plan = Plan(created, current, plan_scope(settings), simulated, interrupted=interrupted)
    seen: set[VmId] = set()
    for index, row in enumerate(rows):
        planned = _planned_vm(row, settings, f"{name}: vms[{index}]")
        if planned.vm_id in seen:
            raise PlanError(f"{name}: vms[{index}]: {planned.vm_id} is in the plan twice")
        seen.add(planned.vm_id)
        plan.vms.append(planned)
    return plan


def _describe_scope(scope: object) -> str:
    if not isinstance(scope, dict):
        return "none recorded"
    if scope.get("managementGroup"):
        return f"management group {scope['managementGroup']}"
    subs = scope.get("subscriptions")
    if subs:
        return "TARGET_SUBSCRIPTIONS " + ", ".join(str(s) for s in subs)[:300]
    return "every subscription the credential can see"


def _planned_vm(row: object, settings: Settings, where: str) -> PlannedVm:
    if not isinstance(row, dict):
        raise PlanError(f"{where} must be an object")
    try:
        vm_id = VmId.parse(str(row.get("id")))
    except InvalidVmId as error:
        raise PlanError(f"{where}: {error}") from None
    try:
        action = Action(str(row.get("action")))
        kind = OutcomeKind(str(row.get("outcome")))
    except ValueError:
        raise PlanError(
            f"{where}: 'action' must be rekey, repair or none, and 'outcome' an outcome word"
        ) from None
    reason, hint, facts = row.get("reason", ""), row.get("hint", ""), row.get("facts", {})
    if not isinstance(reason, str) or not isinstance(hint, str) or not isinstance(facts, dict):
        raise PlanError(f"{where}: 'reason' and 'hint' must be strings, 'facts' an object")
    outcome = Outcome(str(vm_id), kind, reason, hint, dict(facts))
    if action is Action.NONE:
        return PlannedVm(vm_id, outcome, action)
    vm = _vm_facts(vm_id, row.get("vm"), where)
    document = row.get("guest")
    if not isinstance(document, dict):
        raise PlanError(f"{where}: a VM with an action needs 'guest', the detection result it was decided on")
    try:
        guest = parse_document(document)
    except GuestOutputError as error:
        raise PlanError(f"{where}: guest: {error}") from None
    decision = judge(vm, guest, settings)
    if decision.action is not action or decision.reason != reason:
        raise PlanError(
            f"{where}: the plan says {action.value} ({reason}), but the decision table gives "
            f"{decision.action.value} ({decision.reason}) on the plan's own facts: the file was edited, or "
            "made by another version; make a new plan"
        )
    return PlannedVm(vm_id, outcome, action, vm, document, decision)


class PlanApplier:
    """``apply``: each VM of the plan, remediated only where the fresh facts lead to the plan's decision."""

    def __init__(self, inner: Checker, recorder: Recorder, plan: Plan, settings: Settings) -> None:
        self._inner, self._recorder, self._plan, self._settings = inner, recorder, plan, settings

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        planned = self._plan.get(vm_id)
        if planned is None or planned.decision is None:
            raise ValueError(f"{vm_id} has no planned action")
        self._recorder.forget(vm_id)

        async def compare(phase: str, data: Mapping[str, Any]) -> None:
            if phase == "remediate" and data.get("conditional"):
                raise DetectFirst  # a key in the first Run Command: detect first, then compare
            if before_run_command is not None:
                await before_run_command(phase, data)
            if phase == "remediate":
                now = self._fresh(vm_id)
                if now != planned.decision:  # None cannot be here (detection just ran): refused too
                    raise PlanChanged(now)

        try:
            outcome = await self._inner.check(vm_id, before_run_command=compare)
        except PlanChanged as changed:
            return self._changed(planned, changed.now, outcome=None)
        if "action" in outcome.details or outcome.kind is OutcomeKind.REMEDIATED:
            return outcome  # it passed the comparison before the remediation
        vm = self._recorder.vm(vm_id)
        if vm is None:
            return outcome  # not read (scope, ARM trouble): nothing was judged afresh
        now = self._fresh(vm_id)
        if now is None or now.kind in (OutcomeKind.DEFERRED, OutcomeKind.FAILED):
            # Not judged afresh (ARM or Run Command trouble after the read), or a row that waits
            # (the agent, a starting VM): retried with --from, not re-planned.
            return outcome
        if now == planned.decision:
            return outcome  # the same judgement; enforce mode's own rules answered (kms-unreachable)
        return self._changed(planned, now, outcome=outcome)

    def _fresh(self, vm_id: VmId) -> Decision | None:
        """The decision table on what this apply read of the VM; None when it did not read it,
        or the gate let it through and there is no detection result to decide on."""
        vm, document = self._recorder.vm(vm_id), self._recorder.guest(vm_id)
        if vm is None:
            return None
        if document is None:
            return gate(vm, self._settings.with_mode(Mode.AUDIT))
        return judge(vm, parse_document(document), self._settings)

    def _changed(self, planned: PlannedVm, now: Decision | None, *, outcome: Outcome | None) -> Outcome:
        vm, document = self._recorder.vm(planned.vm_id), self._recorder.guest(planned.vm_id)
        changes = _differences(planned, vm, document)
        details: dict[str, Any] = {
            "planned": _decision_dict(planned.decision),
            "now": _decision_dict(now),
            "changed": changes,
        }
        if outcome is not None:
            kept = ("caption", "channel", "osDiskId")
            details.update({k: v for k, v in outcome.details.items() if k in kept})
        what = "; ".join(f"{k} {old} → {new}" for k, (old, new) in changes.items()) or "the decision"
        hint = f"{PLAN_CHANGED_HINT} Changed: {what}."
        return Outcome(str(planned.vm_id), OutcomeKind.SKIPPED, PLAN_CHANGED, hint, details)


def _decision_dict(decision: Decision | None) -> dict[str, Any]:
    if decision is None:
        return {}
    out: dict[str, Any] = {"action": decision.action.value, "reason": decision.reason}
    if decision.kind is not None:
        out["outcome"] = decision.kind.value
    if decision.entry is not None:
        out["edition"] = decision.entry.edition
    return out


_GUEST_FACTS = (
    ("build", ("os", "build")),
    ("editionId", ("os", "editionId")),
    ("sku", ("os", "sku")),
    ("channel", ("license", "description")),
    ("licenseStatus", ("license", "licenseStatus")),
    ("productKeyChannel", ("license", "productKeyChannel")),
    ("kmsMachine", ("license", "kmsMachine")),
    ("discoveredKmsMachine", ("license", "discoveredKmsMachine")),
    ("kmsReachable", ("kmsProbe", "reachable")),
    ("imdsReachable", ("attestation", "imdsReachable")),
    ("chainValid", ("attestation", "chainValid")),
    ("error", ("error", "step")),
)


def _differences(
    planned: PlannedVm, vm: VmFacts | None, document: Mapping[str, Any] | None
) -> dict[str, tuple[Any, Any]]:
    """The facts the decision table reads that differ between the plan and now: name → (then, now)."""
    out: dict[str, tuple[Any, Any]] = {}
    if planned.vm is not None and vm is not None:
        then_vm, now_vm = vm_facts_document(planned.vm), vm_facts_document(vm)
        for key in ("osType", "powerState", "agentReady", "tags"):
            if then_vm[key] != now_vm[key]:
                out[key] = (then_vm[key], now_vm[key])
    if planned.guest is not None and document is not None:
        for name, (section, key) in _GUEST_FACTS:
            then, now = _get(planned.guest, section, key), _get(document, section, key)
            if name == "channel":
                then, now = _channel(then), _channel(now)
            if then != now:
                out[name] = (then, now)
    return out


def _get(document: Mapping[str, Any], section: str, key: str) -> Any:
    part = document.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _channel(description: object) -> str | None:
    return channel_of(description).value if isinstance(description, str) else None


def confirm(plan: Plan, *, stdin: TextIO, stderr: TextIO, what: str) -> bool:
    """Show the counts by planned action and ask; only ``yes`` goes ahead (not ``y``: as terraform's
    apply, "Only 'yes' will be accepted to approve", an answer that changes VMs is typed in full)."""
    counts = plan.counts()
    acting = len(plan.actionable)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if k != Action.NONE.value)
    stderr.write(
        f"{what}: {acting} VM{'s' if acting != 1 else ''} to change ({shown}); "
        f"{counts.get(Action.NONE.value, 0)} with nothing to do or that cannot be acted on.\n"
        "Each VM is detected again first and changed only if the decision is still the plan's.\n"
        "Apply? Type 'yes' to go ahead: "
    )
    stderr.flush()
    answer = stdin.readline().strip().lower()
    return answer == "yes"
