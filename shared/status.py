"""``GET /api/status`` with filters and pages: what the query string means, checked up front.

The filters select VMs by their latest verdict (the ledger's state rows): ``outcome`` (one word or
several, comma-separated), ``reason`` (exact, or a prefix ending in ``*``: ``activation-error:*``),
``vm`` (a full VM id, or a VM name in any resource group) and ``since`` (an ISO 8601 time, or ``30m``,
``24h``, ``7d`` back from now: the verdict was reached then or later). ``pageSize`` (1 to
:data:`MAX_PAGE_SIZE`) bounds each answer; ``continuation`` is the token the previous page returned.
A page stops early once it has read :data:`MAX_SCANNED_PER_PAGE` state rows, so one request never
reads an unbounded table: a short page with a token means "more may follow", an answer without one
is the last page.

What can be said to Table storage is said there (the outcome, the exact reason, the VM key, the
time); a reason prefix and a VM name are matched here, on the rows that come back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.model import InvalidVmId, OutcomeKind, VmId, has_unprintable, parse_time
from shared.retry_later import Answer, answer_or_retry_later

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_SCANNED_PER_PAGE = 5000
DEFAULT_RECENT = 20
MAX_RECENT = 200
# Table storage down, or not answering: 503 within this, never a 500 after the SDK's own retries.
STATUS_DEADLINE_S = 10.0
RETRY_AFTER_S = 30
_RELATIVE = re.compile(r"(\d{1,6})([mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
_VM_NAME = re.compile(r"[-\w.]{1,64}")
_REASON = re.compile(r"[-\w.:]{1,200}")
_TOKEN_VERSION = 1
FILTERS = ("outcome", "reason", "vm", "since")
# "code" is the function key when it is given in the query string (the host reads it, we ignore it).
KNOWN_PARAMS = frozenset({*FILTERS, "pageSize", "continuation", "recent", "code"})


class StatusQueryError(ValueError):
    """The query string is not one this endpoint understands; the message names each problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """A validated ``GET /api/status`` query."""

    outcomes: tuple[OutcomeKind, ...] = ()
    reason: str = ""  # exact match, or a prefix when reason_prefix
    reason_prefix: bool = False
    vm_id: VmId | None = None
    vm_name: str = ""  # lower case
    since: datetime | None = None
    since_text: str = ""  # as given: "24h" means the same filter on every page
    page_size: int = DEFAULT_PAGE_SIZE
    after: str | None = None  # the last state-row key of the previous page
    recent: int = DEFAULT_RECENT

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, now: datetime | None = None) -> StatusQuery:
        """Parse and validate; raise :class:`StatusQueryError` listing every problem at once."""
        now = now or datetime.now(UTC)
        problems: list[str] = []
        unknown = sorted(set(params) - KNOWN_PARAMS)
        if unknown:
            known = ", ".join(sorted(KNOWN_PARAMS))
            problems.append(f"unknown parameter(s) {', '.join(unknown)}: use {known}")

        outcomes: list[OutcomeKind] = []
        for word in (w.strip().lower() for w in params.get("outcome", "").split(",")):
            if not word:
                continue
            try:
                kind = OutcomeKind(word)
            except ValueError:
                words = ", ".join(k.value for k in OutcomeKind)
                problems.append(f"outcome={word[:40]!r}: expected one or more of {words}")
                continue
            if kind not in outcomes:
                outcomes.append(kind)

        reason, prefix = params.get("reason", "").strip(), False
        if reason.endswith("*"):
            reason, prefix = reason[:-1], True
        if reason and not _REASON.fullmatch(reason):
            problems.append(
                f"reason={reason[:60]!r}: a reason word (letters, digits, - . :), optionally ending in *"
            )
        if prefix and not reason:
            problems.append("reason=*: give the start of a reason before the *")

        vm_id, vm_name = None, ""
        vm = params.get("vm", "").strip()
        if vm.startswith("/"):
            try:
                vm_id = VmId.parse(vm)
            except InvalidVmId as error:
                problems.append(f"vm: {error}")
        elif vm:
            if _VM_NAME.fullmatch(vm) and not has_unprintable(vm):
                vm_name = vm.lower()
            else:
                problems.append(f"vm={vm[:80]!r}: a VM resource id (/subscriptions/...) or a VM name")

        since_text = params.get("since", "").strip()
        since = _since(since_text, now, problems)
        page_size = _whole(
            params.get("pageSize", ""), "pageSize", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE, problems
        )
        # recent keeps its old meaning: any whole number, clamped to 0..MAX_RECENT
        recent = _whole(params.get("recent", ""), "recent", DEFAULT_RECENT, -(10**9), 10**9, problems)
        recent = max(0, min(recent, MAX_RECENT))
        query = cls(
            outcomes=tuple(outcomes),
            reason=reason,
            reason_prefix=prefix,
            vm_id=vm_id,
            vm_name=vm_name,
            since=since,
            since_text=since_text,
            page_size=page_size,
            recent=recent,
        )
        token = params.get("continuation", "").strip()
        if token and not problems:
            after = decode_token(token, query.fingerprint())
            if after is None:
                problems.append(
                    "continuation: not a token this endpoint issued for these filters "
                    "(start again without it, or repeat the filters of the first page)"
                )
            else:
                query = cls(**{**_fields(query), "after": after})
        if problems:
            raise StatusQueryError(problems)
        return query

    # ---------------------------------------------------------------- what goes to Table storage

    def table_filter(self) -> tuple[str, dict[str, Any]]:
        """The OData filter on the state rows (without the partition and the page start) and its
        parameters; :meth:`keeps` decides the rest."""
        clauses: list[str] = []
        parameters: dict[str, Any] = {}
        if self.outcomes:
            names = [f"o{i}" for i in range(len(self.outcomes))]
            parameters.update({n: k.value for n, k in zip(names, self.outcomes, strict=True)})
            # spaces around the parentheses: the SDK finds @names by splitting the filter on spaces
            clauses.append("( " + " or ".join(f"outcome eq @{n}" for n in names) + " )")
        if self.reason and not self.reason_prefix:
            clauses.append("reason eq @reason")
            parameters["reason"] = self.reason
        if self.vm_id is not None:
            clauses.append("RowKey eq @vmKey")
            parameters["vmKey"] = "|".join(self.vm_id.key)
        if self.since is not None:
            clauses.append("decidedAt ge @since")
            parameters["since"] = self.since
        return " and ".join(clauses), parameters

    def keeps(self, row: Mapping[str, Any]) -> bool:
        """Whether a state row matches every filter (all of them, also those Table storage applied)."""
        outcome = str(row.get("outcome") or "")
        if not outcome:
            return False  # leased but never given a verdict
        if self.outcomes and outcome not in {k.value for k in self.outcomes}:
            return False
        reason = str(row.get("reason") or "")
        if self.reason:
            matched = reason.startswith(self.reason) if self.reason_prefix else reason == self.reason
            if not matched:
                return False
        vm = VmId.try_parse(row.get("vmId"))
        if self.vm_id is not None and vm != self.vm_id:
            return False
        if self.vm_name and (vm is None or vm.name.lower() != self.vm_name):
            return False
        decided = row.get("decidedAt")
        return self.since is None or (isinstance(decided, datetime) and decided >= self.since)

    def filters(self) -> dict[str, Any]:
        """The filters as the answer echoes them."""
        reason = self.reason + ("*" if self.reason_prefix else "")
        return {
            "outcome": [k.value for k in self.outcomes],
            "reason": reason or None,
            "vm": str(self.vm_id) if self.vm_id else (self.vm_name or None),
            "since": self.since.isoformat() if self.since else None,
        }

    def fingerprint(self) -> str:
        """Ties a continuation token to the filters it was issued for (``since`` as given)."""
        text = json.dumps({**self.filters(), "since": self.since_text}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(after: str, fingerprint: str) -> str:
    raw = json.dumps({"v": _TOKEN_VERSION, "after": after, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, fingerprint: str) -> str | None:
    """The row key a token carries, or ``None`` for anything this endpoint did not issue for these filters."""
    if len(token) > 2000:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("v") != _TOKEN_VERSION or data.get("f") != fingerprint:
        return None
    after = data.get("after")
    if not isinstance(after, str) or not after or len(after) > 1024 or has_unprintable(after):
        return None
    return after


def _fields(query: StatusQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in StatusQuery.__slots__}


def _since(text: str, now: datetime, problems: list[str]) -> datetime | None:
    if not text:
        return None
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = int(relative[1]), _UNITS[relative[2]]
        try:
            return now - timedelta(**{unit: amount})
        except OverflowError:  # before year 1
            problems.append(f"since={text!r}: too far back")
            return None
    parsed = parse_time(text)  # None also for a time whose UTC form leaves years 1..9999
    if parsed is None:
        if _iso_out_of_range(text):  # 9999-12-31T23:00:00-05:00 is after year 9999 in UTC
            problems.append(f"since={text[:40]!r}: out of range once converted to UTC")
        else:
            problems.append(f"since={text[:40]!r}: an ISO 8601 time (2026-12-01T08:00:00Z) or 30m, 24h, 7d")
        return None
    return parsed.astimezone(UTC)


def _iso_out_of_range(text: str) -> bool:
    """A well-formed ISO time that ``parse_time`` refused only because UTC cannot hold it."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _whole(text: str, name: str, default: int, low: int, high: int, problems: list[str]) -> int:
    text = text.strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        problems.append(f"{name}={text[:20]!r}: a whole number from {low} to {high}")
        return default
    if not low <= value <= high:
        problems.append(f"{name}={value}: a whole number from {low} to {high}")
        return default
    return value


# ------------------------------------------------------------------------------------ the answer

HISTORY_FOR_ONE_VM = 20


def state_entry(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """One VM's latest verdict as the answer lists it."""

    def iso(value: object) -> str | None:
        return value.isoformat() if isinstance(value, datetime) else None

    until = row.get("leaseUntil")
    return {
        "vmId": row.get("vmId", ""),
        "outcome": row.get("outcome", ""),
        "reason": row.get("reason", ""),
        "hint": row.get("hint", ""),
        "decidedAt": iso(row.get("decidedAt")),
        "verifiedAt": iso(row.get("verifiedAt")),
        "runs": _count(row.get("runs")),
        "consecutiveFailures": _count(row.get("consecutiveFailures")),
        "consecutiveDeferrals": _count(row.get("consecutiveDeferrals")),
        "inProgress": bool(row.get("leaseOwner")) and isinstance(until, datetime) and until > now,
    }


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def status_page(
    query: StatusQuery, *, env: Mapping[str, str] | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """The summary (counts, in progress, recent actions) and one page of the VMs that match."""
    from shared.triggers import Runtime  # the runtime's clients; shared.triggers never imports this

    now = now or datetime.now(UTC)
    odata, parameters = query.table_filter()
    async with Runtime.open(env) as runtime:
        ledger = await runtime.ledger()
        body = await ledger.status(recent=query.recent, now=now)
        rows, after = await ledger.scan_state(
            odata=odata,
            parameters=parameters,
            after=query.after,
            keep=query.keeps,
            limit=query.page_size,
            max_scanned=MAX_SCANNED_PER_PAGE,
        )
        if query.vm_id is not None:
            body["history"] = await ledger.history(query.vm_id, limit=HISTORY_FOR_ONE_VM)
    body.update(
        filters=query.filters(),
        pageSize=query.page_size,
        items=[state_entry(row, now) for row in rows],
        continuation=encode_token(after, query.fingerprint()) if after else None,
    )
    return body


async def status_answer(
    params: Mapping[str, str], *, env: Mapping[str, str] | None = None, now: datetime | None = None
) -> Answer:
    """200 with :func:`status_page`, 400 naming each problem of the query, 503 with ``Retry-After``
    when the ledger cannot be read within :data:`STATUS_DEADLINE_S`."""
    try:
        query = StatusQuery.from_params(params, now=now)
    except StatusQueryError as error:
        return 400, {"error": str(error)}, {}

    async def page() -> Answer:
        return 200, await status_page(query, env=env, now=now), {}

    return await answer_or_retry_later(
        page(),
        deadline_s=STATUS_DEADLINE_S,
        retry_after_s=RETRY_AFTER_S,
        error="could not read the ledger ({why}); retry later",
    )
