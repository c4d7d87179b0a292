"""Render outcomes for people (a table with hints) and for programs (one JSON object)."""

from __future__ import annotations

import json
import textwrap
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


def as_table(outcomes: Sequence[Outcome], *, mode: str, full_ids: bool = False, width: int = 0) -> str:
    """Rows most urgent first, a summary, and "What to do" grouped by reason.

    With ``width`` > 0 the table fits that many columns: DETAIL is cut first, then the short VM id
    (from the left, keeping the name); ``full_ids`` ids are never cut, so they paste into ``check``.
    Hints are wrapped to the width.
    """
    ordered = sorted(outcomes, key=lambda o: (ORDER.index(o.kind), o.vm_id.lower()))
    rows = [("VM", "OUTCOME", "REASON", "DETAIL")]
    for o in ordered:
        rows.append((o.vm_id if full_ids else _short(o.vm_id), o.kind.value, o.reason, detail(o)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    if width > 0:
        widths = _fit(widths, width, fixed_first=full_ids)
    lines = []
    for r in rows:
        cells = [_cut(r[0], widths[0], left=True), r[1], _cut(r[2], widths[2]), _cut(r[3], widths[3])]
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cells) if widths[i] > 0).rstrip())
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
            item = f"  {reason} ({n} VM{'s' if n != 1 else ''}): {text}"
            if width > 0:
                lines.extend(textwrap.wrap(item, width, subsequent_indent="    ", break_on_hyphens=False))
            else:
                lines.append(item)
        for line in paths:  # commands are never wrapped: they must paste as they are
            if width > 0 and not line.startswith("      "):
                lines.extend(textwrap.wrap(line, width, subsequent_indent="    ", break_on_hyphens=False))
            else:
                lines.append(line)
    return "\n".join(lines)


def blocked_path(o: Outcome) -> bool:
    """The VM's KMS path is blocked on Azure's side (issue 11): its fix is told once per resource."""
    path = o.details.get("kmsPath")
    return isinstance(path, Mapping) and path.get("state") == "blocked"


def path_groups(outcomes: Sequence[Outcome]) -> list[str]:
    """One entry per resource at fault with the VMs behind it: fixing it once repairs them all."""
    groups: dict[tuple[str, str, tuple[str, ...]], tuple[list[str], Mapping[str, Any], dict[str, None]]] = {}
    for o in outcomes:
        if not blocked_path(o):
            continue
        for finding in o.details["kmsPath"].get("findings") or []:
            if not isinstance(finding, Mapping):
                continue
            # The fix is part of the key: VMs behind one resource whose fixes differ (one internal
            # load balancer over two subnets: a NAT gateway on each; one NSG with two denying rules)
            # get one entry per fix, never the first VM's fix for all (review r11b).
            fix = tuple(str(c) for c in finding.get("fix") or [])
            key = (str(finding.get("cause")), str(finding.get("resource")).lower(), fix)
            vms, _, subnets = groups.setdefault(key, ([], finding, {}))
            vms.append(f"{_short(o.vm_id).rsplit('/', 1)[-1]} ({o.kind.value}: {o.reason})")
            if finding.get("subnet"):
                subnets[str(finding["subnet"]).rsplit("/", 1)[-1]] = None
    lines = []
    for (cause, _, _), (vms, finding, subnets) in groups.items():
        n = len(vms)
        who = f"{n} VM{'s' if n != 1 else ''}: {', '.join(vms)}"
        text = str(finding.get("text") or "")
        # the text names the first VM's subnet; one resource (a route table, an NSG) can serve more
        more = f" The same holds in subnets {', '.join(subnets)}." if len(subnets) > 1 else ""
        lines.append(f"  KMS path, {cause} ({who}): {text[:1].upper()}{text[1:]}.{more}")
        fixes = [str(c) for c in finding.get("fix") or []]
        if fixes:
            scope = "both" if n == 2 else f"all {n}" if n > 2 else "it"
            lines.append(f"    Fix once for {scope} (not applied; run as a network admin):")
            lines.extend(f"      {command}" for command in fixes)
    return lines


def _fit(widths: list[int], width: int, *, fixed_first: bool) -> list[int]:
    """Column widths (VM, OUTCOME, REASON, DETAIL) that fit ``width`` with two spaces between."""
    out = list(widths)
    over = sum(out) + 2 * 3 - width
    if over <= 0:
        return out
    keep_detail = 12  # below this a DETAIL column says nothing: it is dropped instead
    cut = min(over, max(0, out[3] - keep_detail))
    out[3] -= cut
    over -= cut
    if over > 0 and out[3] > 0:
        over -= out[3] + 2
        out[3] = 0
    if over > 0 and not fixed_first:
        out[0] = max(len("VM"), out[0] - over)
    return out


def _cut(text: str, width: int, *, left: bool = False) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return "…" + text[-(width - 1) :] if left else text[: width - 1] + "…"


def _short(vm_id: str) -> str:
    parsed = VmId.try_parse(vm_id)
    if parsed is None:
        return vm_id
    return f"{parsed.subscription_id[:8]}/{parsed.resource_group}/{parsed.name}"


def detail(o: Outcome, *, limit: int | None = 80) -> str:
    """The few facts that explain a row: edition or caption, channel (before→after), the error."""
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
        error = str(d["error"])
        parts.append(error if limit is None else error[:limit])
    return "; ".join(parts)
