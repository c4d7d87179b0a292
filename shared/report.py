"""Render outcomes for people (a table with hints) and for programs (one JSON object)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.model import Outcome, OutcomeKind, VmId

# Most urgent first, so the table reads from what needs a person to what is fine.
ORDER = [
    OutcomeKind.FAILED,
    OutcomeKind.DEFERRED,
    OutcomeKind.REMEDIATED,
    OutcomeKind.WOULD_REMEDIATE,
    OutcomeKind.SKIPPED,
    OutcomeKind.HEALTHY,
]


def summary(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = Counter(o.kind for o in outcomes)
    return {kind.value: counts[kind] for kind in ORDER if counts[kind]}


def as_json(outcomes: Sequence[Outcome], *, extra: Mapping[str, Any] | None = None) -> str:
    ordered = sorted(outcomes, key=lambda o: (ORDER.index(o.kind), o.vm_id.lower()))
    doc: dict[str, Any] = {"summary": summary(outcomes), "vms": [o.as_dict() for o in ordered]}
    doc.update(extra or {})
    return json.dumps(doc, indent=2, sort_keys=False)


def as_table(outcomes: Sequence[Outcome], *, mode: str) -> str:
    ordered = sorted(outcomes, key=lambda o: (ORDER.index(o.kind), o.vm_id.lower()))
    rows = [("VM", "OUTCOME", "REASON", "DETAIL")]
    for o in ordered:
        rows.append((_short(o.vm_id), o.kind.value, o.reason, _detail(o)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines = [line.rstrip() for line in lines]
    counts = summary(outcomes)
    lines.append("")
    lines.append(f"{len(outcomes)} VMs, mode {mode}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if mode == "audit" and counts.get(OutcomeKind.WOULD_REMEDIATE.value):
        lines.append("Nothing was changed (audit). Re-run with --apply to remediate.")
    hints: dict[str, tuple[int, str]] = {}
    for o in ordered:
        if o.hint and not blocked_path(o):
            key = (
                f"{o.reason} (cause inside the guest)"
                if o.details.get("kmsCause") == "in-guest"
                else o.reason
            )
            n, _ = hints.get(key, (0, ""))
            hints[key] = (n + 1, o.hint)
    paths = path_groups(ordered)
    if hints or paths:
        lines.append("")
        lines.append("What to do:")
        for reason, (n, text) in hints.items():
            lines.append(f"  {reason} ({n} VM{'s' if n != 1 else ''}): {text}")
        lines.extend(paths)
    return "\n".join(lines)


def blocked_path(o: Outcome) -> bool:
    """The VM's KMS path is blocked on Azure's side (issue 11): its fix is told once per resource."""
    path = o.details.get("kmsPath")
    return isinstance(path, Mapping) and path.get("state") == "blocked"


def path_groups(outcomes: Sequence[Outcome]) -> list[str]:
    """One entry per resource at fault with the VMs behind it: fixing it once repairs them all."""
    groups: dict[tuple[str, str], tuple[list[str], Mapping[str, Any]]] = {}
    for o in outcomes:
        if not blocked_path(o):
            continue
        for finding in o.details["kmsPath"].get("findings") or []:
            if not isinstance(finding, Mapping):
                continue
            key = (str(finding.get("cause")), str(finding.get("resource")).lower())
            vms, _ = groups.setdefault(key, ([], finding))
            vms.append(f"{_short(o.vm_id).rsplit('/', 1)[-1]} ({o.kind.value}: {o.reason})")
    lines = []
    for (cause, _), (vms, finding) in groups.items():
        n = len(vms)
        who = f"{n} VM{'s' if n != 1 else ''}: {', '.join(vms)}"
        text = str(finding.get("text") or "")
        lines.append(f"  KMS path, {cause} ({who}): {text[:1].upper()}{text[1:]}.")
        fixes = [str(c) for c in finding.get("fix") or []]
        if fixes:
            scope = f"all {n}" if n > 1 else "it"
            lines.append(f"    Fix once for {scope} (not applied; run as a network admin):")
            lines.extend(f"      {command}" for command in fixes)
    return lines


def _short(vm_id: str) -> str:
    parsed = VmId.try_parse(vm_id)
    if parsed is None:
        return vm_id
    return f"{parsed.subscription_id[:8]}/{parsed.resource_group}/{parsed.name}"


def _detail(o: Outcome) -> str:
    d = o.details
    parts = []
    if "edition" in d:
        parts.append(str(d["edition"]))
    elif "caption" in d:
        parts.append(str(d["caption"]))
    if "channel" in d and "channelAfter" in d:
        parts.append(f"{d['channel']}→{d['channelAfter']}")
    elif "channel" in d:
        parts.append(str(d["channel"]))
    if "error" in d and o.kind in (OutcomeKind.FAILED, OutcomeKind.DEFERRED):
        parts.append(str(d["error"])[:80])
    return "; ".join(parts)
