"""Log Analytics and Resource Graph as the engine meets them: its own queries, answered from the estate.

Neither service runs KQL here. Each recognises the engine's queries by what they mention (the SPP
event query; the Windows-VM listing and the computer-name lookup of Resource Graph) and answers
them from the live estate, so a VM fixed by Run Command stops logging 0xC004FD02 and a deleted VM
leaves the inventory. Anything else is a 400, so an engine that changes its query notices here
rather than in Azure. Shapes: the Log Analytics query API example (oms-post-example.json) and the
Resource Graph paging examples (ResourcesFirstPageQuery.json, ResourcesNextPageQuery.json);
departures from Azure are listed in docs/simulator.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from simulator.arm import ArmResponse, Compute, VmView, arm_error

# The Log Analytics audience of each cloud (the token's ``aud``), as azure-monitor-query expects it.
LOG_ANALYTICS_AUDIENCES: Final[Mapping[str, str]] = {
    "AzureCloud": "https://api.loganalytics.io",
    "AzureUSGovernment": "https://api.loganalytics.us",
    "AzureChinaCloud": "https://api.loganalytics.azure.cn",
}
# An AVMA guest in Azure retries activation and logs 0xC004FD02 on this cadence (a model, not a
# measured Windows interval): short enough that any scan window of 5 minutes or more sees each VM.
SPP_EVENT_INTERVAL_S: Final = 300
# The workspace's default retention: the oldest events are this old when the simulator starts, and
# a query with no timespan covers it.
RETENTION: Final = timedelta(days=30)
LOG_COLUMNS: Final = (
    {"name": "_ResourceId", "type": "string"},
    {"name": "Computer", "type": "string"},
    {"name": "LastSeen", "type": "datetime"},
    {"name": "Events", "type": "long"},
)
# The body the query API adds to a 200 when part of the query failed (the SDK's LogsQueryPartialResult).
PARTIAL_ERROR: Final = {
    "code": "PartialError",
    "message": "There were some errors when processing your query.",
    "details": [{"code": "EngineError", "message": "Query exceeded limits"}],
}
# The SPP event an AVMA guest logs when activation fails, as the Event table holds it.
SPP_EVENT_ID: Final = 8198
# The wording and the XML layout are modelled (no public capture of this event was found): what
# matters is that the code appears in both, and only in EventData when descriptions are not rendered.
SPP_DESCRIPTION: Final = "License Activation (slui.exe) failed with the following error code:\nhr=0xC004FD02"
SPP_EVENT_DATA: Final = (
    '<DataItem type="System.XmlData">'
    '<EventData xmlns="http://schemas.microsoft.com/win/2004/08/events/event">'
    "<Data>hr=0xC004FD02</Data>"
    "</EventData></DataItem>"
)
# The columns of the Event table the simulator can filter on, and the one summary it computes.
EVENT_COLUMNS: Final = (
    "EventLog",
    "Source",
    "EventID",
    "EventLevelName",
    "Computer",
    "_ResourceId",
    "RenderedDescription",
    "EventData",
)
EVENT_SUMMARY: Final = "summarize LastSeen=max(TimeGenerated), Events=count() by _ResourceId, Computer"
_EVENT_PREDICATE = re.compile(
    r"^(?P<column>[A-Za-z_]\w*)\s+(?P<op>==|=~|!=|contains|has)\s+"
    r"(?:\"(?P<double>[^\"\\]*)\"|'(?P<single>[^'\\]*)')$"
)
GRAPH_MAX_TOP: Final = 1000
# VM listings whose rows are kept for their later pages (ResourceGraph._answer).
_LISTINGS_KEPT: Final = 8
_SUBSCRIPTION_TYPE: Final = "microsoft.resources/subscriptions"
_CONTAINER_STAGE = re.compile(
    r"^(?:where\s+(?P<column>type|subscriptionId)\s+=~\s+'(?P<literal>[^'\\]*)'|project\s+subscriptionId)$"
)
# Resource Graph's throttling answer (Azure/azure-cli-extensions#3325) and quota headers
# (guidance-for-throttled-requests.md).
GRAPH_THROTTLED_MESSAGE: Final = (
    "Client application has been throttled and should not attempt to repeat the request until an "
    "amount of time has elapsed. Please see https://aka.ms/resourcegraph-throttling for help."
)
GRAPH_SUPPORT_MESSAGE: Final = "Please provide below info when asking for support: simulated request."
# The principal an authorization error names (one identity in the simulator; the value is made up).
GRAPH_PRINCIPAL: Final = "5b7e2c1a-0d4f-4e8a-9c3b-6f1d2e3a4b5c"
_VM_TYPE: Final = "microsoft.compute/virtualmachines"
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_INSTANT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?$"
)
# One comparison of a ``where``: ``tostring(path) op 'literal'`` or ``path op 'literal'``.
_PREDICATE = re.compile(
    r"^(?:tostring\(\s*(?P<wrapped>[A-Za-z_][\w.]*)\s*\)|(?P<bare>[A-Za-z_][\w.]*))"
    r"\s*(?P<op>=~|!~|==|!=)\s*'(?P<literal>[^'\\]*)'$"
)
_ORDER = re.compile(r"^order\s+by\s+id(?:\s+asc)?$", re.IGNORECASE)
# The columns a row of the Resources table has for a VM (properties hold the rest).
GRAPH_COLUMNS: Final = ("id", "name", "type", "location", "resourceGroup", "subscriptionId", "tags")
# A computed column of a ``project``: ``alias = tostring(path)`` (KQL's project with a new name).
_COMPUTED = re.compile(r"^(?P<alias>[A-Za-z_]\w*)\s*=\s*tostring\(\s*(?P<path>[A-Za-z_][\w.]*)\s*\)$")
Predicate = tuple[str, str, str]  # (property path, operator, literal)
Column = tuple[str, str, bool]  # (name in the result, property path, through tostring())


def default_workspace_id(subscriptions: Sequence[str]) -> str:
    """A workspace GUID that is stable for an estate (same subscriptions, same id)."""
    seed = "avma-remediator-simulator-workspace:" + ",".join(sorted(s.lower() for s in subscriptions))
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5 layout, so it reads as an ordinary GUID
    digest[8] = (digest[8] & 0x3F) | 0x80
    hexed = digest.hex()
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def _la_error(
    status: int, code: str, message: str, details: list[dict[str, str]] | None = None
) -> ArmResponse:
    """The Log Analytics error envelope ``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return ArmResponse(status, {"error": error})


class LogAnalytics:
    """One workspace's ``Event`` table, as far as the engine's SPP query can see it; thread-safe."""

    def __init__(
        self,
        compute: Compute,
        *,
        workspace_id: str,
        audience: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        interval_s: int = SPP_EVENT_INTERVAL_S,
        render_descriptions: bool = True,
    ) -> None:
        if not _GUID.match(workspace_id):
            raise ValueError("workspace_id must be a GUID")
        if interval_s < 1:
            raise ValueError("interval_s must be 1 or more")
        self.compute = compute
        self.workspace_id = workspace_id
        self.audience = audience.rstrip("/")
        self.interval_s = interval_s
        # False: the agent does not render event descriptions (RenderedDescription is empty) and the
        # error code is only in EventData.
        self.render_descriptions = render_descriptions
        self._clock = clock
        self._history_start = clock() - RETENTION
        self._lock = threading.Lock()
        self._partial = False
        self._log: list[dict[str, Any]] = []

    def set_partial_error(self, on: bool) -> None:
        """From now on, answer with half the rows plus the PartialError body (or stop doing so)."""
        with self._lock:
            self._partial = on

    def queries(self) -> list[dict[str, Any]]:
        """Every query request: workspace, query, timespan, window, token audience, status, rows."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def handle(
        self, method: str, parts: Sequence[str], body: bytes, *, token_audience: str | None
    ) -> ArmResponse:
        """Answer ``POST /v1/workspaces/{id}/query``; ``token_audience`` is None without a valid token."""
        entry: dict[str, Any] = {"workspace": parts[2] if len(parts) > 2 else None}
        entry["audience"] = token_audience
        answer = self._answer(method, parts, body, token_audience, entry)
        entry["status"] = answer.status
        with self._lock:
            self._log.append(entry)
        return answer

    def _answer(
        self,
        method: str,
        parts: Sequence[str],
        body: bytes,
        token_audience: str | None,
        entry: dict[str, Any],
    ) -> ArmResponse:
        low = [p.lower() for p in parts]
        if len(low) != 4 or low[0] != "v1" or low[1] != "workspaces" or low[3] != "query":
            return _la_error(404, "PathNotFoundError", "The requested path does not exist")
        if method != "POST":
            return _la_error(405, "MethodNotAllowed", f"{method} is not allowed; the simulator takes POST")
        if token_audience is None:
            return _la_error(401, "AuthorizationRequiredError", "Valid authentication was not provided")
        if token_audience.rstrip("/") != self.audience:
            # A token for another resource (ARM, or the endpoint URL when no audience is set).
            return _la_error(
                403, "InvalidTokenError", "The provided authentication is not valid for this resource"
            )
        workspace = parts[2]
        if not _GUID.match(workspace):
            return _la_error(404, "PathNotFoundError", "The requested path does not exist")
        if workspace.lower() != self.workspace_id.lower():
            return _la_error(404, "WorkspaceNotFoundError", "The workspace could not be found")
        try:
            data = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("query"), str) or not data["query"]:
            return _la_error(400, "BadArgumentError", "The request had some invalid properties")
        query = data["query"]
        entry["query"] = query
        timespan = data.get("timespan")
        entry["timespan"] = timespan
        if timespan is not None and not isinstance(timespan, str):
            return _la_error(400, "BadArgumentError", "The request had some invalid properties")
        filters = _event_query(query)
        if isinstance(filters, str):
            return _la_error(
                400,
                "BadArgumentError",
                "The request had some invalid properties",
                [{"code": "UnsupportedQuery", "message": f"{filters} (docs/simulator.md)."}],
            )
        now = self._clock()
        window = _window(timespan or "", now)
        if window is None:
            return _la_error(
                400,
                "BadArgumentError",
                "The request had some invalid properties",
                [{"code": "InvalidTimespan", "message": f"Cannot parse timespan {str(timespan)[:80]!r}"}],
            )
        # No event is in the future, and none is older than the retention at start-up.
        start, end = max(window[0], self._history_start), min(window[1], now)
        entry["start"], entry["end"] = start, end
        rows = [
            row
            for view in self.compute.snapshot()
            if view.channel == "AVMA"
            and all(_event_holds(clause, self._event(view)) for clause in filters)
            and (row := self._row(view, start, end)) is not None
        ]
        with self._lock:
            partial = self._partial
        partial = partial or self.compute.faults.fire("logPartialError", workspace)
        body_out: dict[str, Any] = {"tables": [{"name": "PrimaryResult", "columns": list(LOG_COLUMNS)}]}
        if partial:
            rows = rows[: math.ceil(len(rows) / 2)]
            body_out["error"] = PARTIAL_ERROR
        body_out["tables"][0]["rows"] = rows
        entry["rows"] = len(rows)
        entry["partial"] = partial
        return ArmResponse(200, body_out)

    def _event(self, view: VmView) -> dict[str, str]:
        """The columns of the SPP event an AVMA VM logs (every one alike but for its time).

        Event 8198 with its ``hr=0x…`` parameter, as the Event table stores it: the rendered text in
        RenderedDescription (empty when the agent does not render it) and the raw parameters as XML
        in EventData (the wording and the XML layout are modelled, docs/simulator.md).
        """
        spec = view.spec
        return {
            "EventLog": "Application",
            "Source": "Microsoft-Windows-Security-SPP",
            "EventID": str(SPP_EVENT_ID),
            "EventLevelName": "Error",
            "Computer": spec.hostname,
            "_ResourceId": spec.id.lower() if spec.log_resource_id else "",
            "RenderedDescription": SPP_DESCRIPTION if self.render_descriptions else "",
            "EventData": SPP_EVENT_DATA,
        }

    def _row(self, view: VmView, start: datetime, end: datetime) -> list[Any] | None:
        """The summarised row of one VM, or None when it logged no 0xC004FD02 event in the window."""
        if view.channel != "AVMA" or end <= start:
            return None
        spec = view.spec
        interval = self.interval_s
        phase = int.from_bytes(hashlib.sha256(spec.key.encode()).digest()[:4], "big") % interval
        first = math.ceil((start.timestamp() - phase) / interval)
        last = math.floor((end.timestamp() - phase) / interval)
        if last < first:
            return None
        seen = datetime.fromtimestamp(phase + last * interval, UTC)
        # The Event table keeps _ResourceId in lower case; an agent that does not know the VM leaves it empty.
        resource_id = spec.id.lower() if spec.log_resource_id else ""
        return [resource_id, spec.hostname, seen.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"), last - first + 1]


def _event_query(query: str) -> list[list[tuple[str, str, str]]] | str:
    """The ``where`` clauses (each a list of alternatives) of an Event query, or why it is not one.

    The subset the simulator evaluates: ``Event``, ``| where`` comparisons ``Column op "literal"``
    (or ``'literal'``)
    (``==``, ``=~``, ``!=``, ``contains``, ``has``) joined by all ``or`` or all ``and``, and last the
    engine's summarize.
    """
    stages = [stage.strip() for stage in re.split(r'\|(?=(?:[^"]*"[^"]*")*[^"]*$)', query)]
    if stages[0] != "Event":
        return "The simulator answers queries of the Event table only"
    if len(stages) < 2 or " ".join(stages[-1].split()) != EVENT_SUMMARY:
        return f"The simulator computes only '{EVENT_SUMMARY}'"
    filters: list[list[tuple[str, str, str]]] = []
    for stage in stages[1:-1]:
        word, _, rest = stage.partition(" ")
        if word != "where":
            return f"Unsupported operator: {stage[:80]!r}"
        parts = re.split(r'\s+(or|and)\s+(?=(?:[^"]*"[^"]*")*[^"]*$)', rest.strip())
        joins = set(parts[1::2])
        if len(joins) > 1:
            return "Mixing 'and' and 'or' in one where is not supported"
        predicates: list[tuple[str, str, str]] = []
        for text in parts[0::2]:
            match = _EVENT_PREDICATE.match(text.strip())
            if match is None:
                return f"Unsupported comparison: {text.strip()[:80]!r}"
            if match["column"] not in EVENT_COLUMNS:
                return f"Failed to resolve column {match['column']!r}"
            literal = match["double"] if match["double"] is not None else match["single"]
            predicates.append((match["column"], match["op"], literal))
        if joins == {"and"}:
            filters.extend([p] for p in predicates)
        else:
            filters.append(predicates)
    return filters


def _event_holds(clause: list[tuple[str, str, str]], event: Mapping[str, str]) -> bool:
    """Whether any comparison of the clause holds on the event (``has`` is taken as ``contains``)."""
    for column, op, literal in clause:
        value = event.get(column, "")
        if op == "==" and value == literal:
            return True
        if op == "=~" and value.lower() == literal.lower():
            return True
        if op == "!=" and value != literal:
            return True
        if op in ("contains", "has") and literal.lower() in value.lower():
            return True
    return False


def _window(timespan: str, now: datetime) -> tuple[datetime, datetime] | None:
    """An ISO 8601 timespan (``PT1H``, ``start/end``, ``start/PT1H``, ``PT1H/end``) as (start, end)."""
    if not timespan:
        return now - RETENTION, now
    if "/" not in timespan:
        duration = _duration(timespan)
        return None if duration is None else (now - duration, now)
    left, _, right = timespan.partition("/")
    start, end = _instant(left), _instant(right)
    if start is not None and end is not None:
        return start, end
    if start is not None and (span := _duration(right)) is not None:
        return start, start + span
    if end is not None and (span := _duration(left)) is not None:
        return end - span, end
    return None


def _duration(text: str) -> timedelta | None:
    match = _DURATION.match(text)
    if match is None or not any(match.groupdict().values()):
        return None
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    days, hours = parts.get("d", 0.0), parts.get("h", 0.0)
    return timedelta(days=days, hours=hours, minutes=parts.get("m", 0.0), seconds=parts.get("s", 0.0))


def _instant(text: str) -> datetime | None:
    match = _INSTANT.match(text)
    if match is None:
        return None
    zone = match["zone"] or "Z"
    micro = (match["frac"] or "").ljust(6, "0")[:6]
    try:
        return datetime.fromisoformat(
            f"{match['date']}T{match['time']}.{micro}{'+00:00' if zone == 'Z' else zone}"
        )
    except ValueError:
        return None


def _graph_error(status: int, code: str, message: str) -> ArmResponse:
    """Resource Graph's error envelope: a generic outer error with the reason in ``details``."""
    return ArmResponse(
        status,
        {
            "error": {
                "code": "BadRequest" if status == 400 else code,
                "message": GRAPH_SUPPORT_MESSAGE,
                "details": [{"code": code, "message": message}],
            }
        },
    )


class ResourceGraph:
    """``POST /providers/Microsoft.ResourceGraph/resources`` for the engine's two queries; thread-safe."""

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._lock = threading.Lock()
        self._throttle = 0
        self._resets_after_s = 5
        self._retry_after_s: int | None = None
        self._log: list[dict[str, Any]] = []
        # The rows of the last few VM listings, by the listing id their skip tokens carry: a later
        # page is cut from the rows the first page was (see _answer).
        self._listings: OrderedDict[int, tuple[Hashable, list[list[Any]]]] = OrderedDict()
        self._listing_ids = itertools.count(1)

    def throttle(self, requests: int, *, resets_after_s: int = 5, retry_after_s: int | None = None) -> None:
        """The next ``requests`` queries get 429 ``RateLimiting``, quota back in ``resets_after_s``.

        ``retry_after_s`` adds a ``Retry-After`` header too (a guess: Resource Graph documents only
        its quota headers; ARM's 429s carry ``Retry-After``, and request-limits-and-throttling.md
        says its handling applies to Resource Graph as well).
        """
        if requests < 0 or not 0 <= resets_after_s < 86_400:
            raise ValueError("requests must be 0 or more, resets_after_s within a day")
        if retry_after_s is not None and not 0 <= retry_after_s < 86_400:
            raise ValueError("retry_after_s within a day")
        with self._lock:
            self._throttle = requests
            self._resets_after_s = resets_after_s
            self._retry_after_s = retry_after_s

    def queries(self) -> list[dict[str, Any]]:
        """Every request: kind, scope, $top, $skipToken, rows returned, status."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def handle(self, body: bytes) -> ArmResponse:
        """Answer one authenticated, routed query (api-version already checked by the server).

        The quota (simulator/throttle.py) counts every query the hook did not refuse first, and
        every answer carries its headers, as guidance-for-throttled-requests.md says."""
        entry: dict[str, Any] = {}
        answer = self._forced_throttle()
        if answer is None:
            quota = self.compute.throttle.graph()
            if quota is not None and not quota.allowed:
                answer = _rate_limited(quota.headers())
                entry["quota"] = "exceeded"
            else:
                answer = self._answer(body, entry)
                if quota is not None:
                    answer = ArmResponse(answer.status, answer.body, {**answer.headers, **quota.headers()})
        entry["status"] = answer.status
        with self._lock:
            self._log.append(entry)
        return answer

    def _forced_throttle(self) -> ArmResponse | None:
        """A 429 of :meth:`throttle`, while it has some left to give."""
        with self._lock:
            if self._throttle <= 0:
                return None
            self._throttle -= 1
            return _rate_limited(
                {
                    "x-ms-user-quota-remaining": "0",
                    "x-ms-user-quota-resets-after": _hms(self._resets_after_s),
                    **({"Retry-After": str(self._retry_after_s)} if self._retry_after_s is not None else {}),
                }
            )

    def _scope(self, subscriptions: list[str], groups: list[str]) -> set[str] | ArmResponse | None:
        """The subscriptions (lower case) a query reaches; None: all of the estate (the tenant)."""
        if subscriptions:
            return {s.lower() for s in subscriptions}
        if not groups:
            return None
        reached: set[str] = set()
        for group in groups:
            subs = self.compute.estate.group_subscriptions(group)
            if subs is None:
                return _graph_error(
                    403,
                    "AuthorizationFailed",
                    f"The client '{GRAPH_PRINCIPAL}' does not have authorization to perform action "
                    "'Microsoft.Management/managementGroups/read' over scope "
                    f"'/providers/Microsoft.Management/managementGroups/{group[:90]}' "
                    "or the scope is invalid.",
                )
            reached.update(s.lower() for s in subs)
        return reached

    def _answer(self, body: bytes, entry: dict[str, Any]) -> ArmResponse:
        parsed = _graph_request(body)
        if isinstance(parsed, ArmResponse):
            return parsed
        query, subscriptions, groups, options = parsed
        entry.update(subscriptions=subscriptions, managementGroups=groups, top=options.get("$top"))
        entry["skipToken"] = options.get("$skipToken")
        if subscriptions and groups:
            return _graph_error(400, "InvalidScope", "Give subscriptions or managementGroups, not both.")
        scope = self._scope(subscriptions, groups)
        if isinstance(scope, ArmResponse):
            return scope
        if query.strip().lower().startswith("resourcecontainers"):
            return self._containers(query, scope, options, entry)
        low = query.lower()
        parsed_query = _graph_query(query)
        if isinstance(parsed_query, str):
            return _graph_error(400, "InvalidQuery", parsed_query)
        filters, columns = parsed_query
        if not any(clause == [("type", "=~", _VM_TYPE)] for clause in filters):
            return _graph_error(400, "InvalidQuery", "The simulator holds only VMs: filter on their type.")
        if "computername" in low:
            entry["kind"] = "resolve_computer"
        elif "powerstate" in low:
            entry["kind"] = "list_vms"
        elif "ostype" in low:
            entry["kind"] = "windows_vms"
        else:
            entry["kind"] = "query"
        names = [name for name, _, _ in columns]
        # A later page of a listing is cut from the rows its first page was: building every VM's
        # document again for each page made a listing cost pages x VMs (10 pages of a 10,000-VM
        # estate: 100,000 documents, seconds of the simulator's one event loop, every ARM answer
        # waiting). The skip token names its listing (the query, its scope and options are the
        # client's to repeat, as Resource Graph's continuation does); one whose listing is gone, or
        # that names none, is served from the estate as it is now, as before.
        asked = (query, None if scope is None else frozenset(scope))
        listing = _token_listing(options.get("$skipToken"))
        with self._lock:
            cached = self._listings.get(listing) if listing is not None else None
        if cached is not None and cached[0] == asked:
            return self._page(cached[1], names, options, entry, listing=listing)
        views = self.compute.snapshot()
        # The scope: the subscriptions given, those of the management groups, or the whole estate.
        if scope is not None:
            views = [v for v in views if v.spec.subscription_id.lower() in scope]
        docs = [_graph_document(v) for v in views]
        docs = [d for d in docs if all(_holds(clause, d) for clause in filters)]
        docs.sort(key=lambda d: str(d["id"]))
        rows = [[_column(d, column) for column in columns] for d in docs]
        with self._lock:
            listing = next(self._listing_ids)
        answer = self._page(rows, names, options, entry, listing=listing)
        # Kept only when a later page may be asked for (its token names it): an answer of one page,
        # or a refused token, would otherwise push a listing in progress out of the few kept.
        if isinstance(answer.body, dict) and "$skipToken" in answer.body:
            with self._lock:
                self._listings[listing] = (asked, rows)
                while len(self._listings) > _LISTINGS_KEPT:
                    self._listings.popitem(last=False)
        return answer

    def _containers(
        self, query: str, scope: set[str] | None, options: Mapping[str, Any], entry: dict[str, Any]
    ) -> ArmResponse:
        """``ResourceContainers`` of type ``microsoft.resources/subscriptions``: the estate's subscriptions.

        The subscriptions in scope: those given, those of the management groups (every one, when
        the estate has no ``managementGroups``), or all of the estate; one that is not in the estate
        is in none. Only ``where`` comparisons on ``type`` and ``subscriptionId`` and ``project
        subscriptionId`` are evaluated (the scope check's and the listing's queries).
        """
        entry["kind"] = "subscriptions"
        stages = [stage.strip() for stage in query.split("|")]
        wanted_type = _SUBSCRIPTION_TYPE
        filters: list[tuple[str, str]] = []
        for stage in stages[1:]:
            match = _CONTAINER_STAGE.match(stage)
            if match is None:
                return _graph_error(400, "InvalidQuery", f"Unsupported stage: {stage[:80]!r}.")
            if match["column"]:
                filters.append((match["column"], match["literal"].lower()))
        if ("type", wanted_type) not in filters:
            return _graph_error(400, "InvalidQuery", "Filter ResourceContainers on the subscription type.")
        subs = [s.lower() for s in self.compute.estate.subscriptions]
        if scope is not None:
            subs = [s for s in subs if s in scope]
        rows = [[s] for s in sorted(subs) if all(v == s for c, v in filters if c == "subscriptionId")]
        return self._page(rows, ["subscriptionId"], options, entry)

    def _page(
        self,
        rows: list[list[Any]],
        columns: list[str],
        options: Mapping[str, Any],
        entry: dict[str, Any],
        *,
        listing: int | None = None,
    ) -> ArmResponse:
        top = options.get("$top", GRAPH_MAX_TOP)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= GRAPH_MAX_TOP:
            return _graph_error(400, "InvalidQueryOptions", f"$top must be between 1 and {GRAPH_MAX_TOP}.")
        skip = options.get("$skip", 0)
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            return _graph_error(400, "InvalidQueryOptions", "$skip must be 0 or more.")
        offset = skip
        token = options.get("$skipToken")
        if token is not None:
            decoded = _decode_token(token)
            if decoded is None:
                return _graph_error(400, "InvalidSkipToken", "The skip token is invalid.")
            offset = decoded
        page = rows[offset : offset + top]
        entry["rows"] = len(page)
        result_format = options.get("resultFormat", "objectArray")
        data: Any
        if result_format == "table":
            data = {"columns": [{"name": c, "type": "string"} for c in columns], "rows": page}
        else:
            data = [dict(zip(columns, row, strict=True)) for row in page]
        out: dict[str, Any] = {
            "totalRecords": len(rows),
            "count": len(page),
            "resultTruncated": "false",
            "facets": [],
            "data": data,
        }
        if offset + top < len(rows):
            out["$skipToken"] = _encode_token(offset + top, listing)
        return ArmResponse(200, out)


def _hms(seconds: int) -> str:
    """``hh:mm:ss``, the format of ``x-ms-user-quota-resets-after``."""
    return f"{seconds // 3600:02}:{seconds % 3600 // 60:02}:{seconds % 60:02}"


def _rate_limited(headers: Mapping[str, str]) -> ArmResponse:
    """Resource Graph's 429 ``RateLimiting`` (Azure/azure-cli-extensions#3325) with these headers."""
    return ArmResponse(
        429,
        {
            "error": {
                "code": "RateLimiting",
                "message": GRAPH_SUPPORT_MESSAGE,
                "details": [{"code": "RateLimiting", "message": GRAPH_THROTTLED_MESSAGE}],
            }
        },
        dict(headers),
    )


def _graph_request(
    raw: bytes,
) -> tuple[str, list[str], list[str], Mapping[str, Any]] | ArmResponse:
    """Validate a QueryRequest body: ``query``, ``subscriptions``, ``managementGroups``, ``options``."""
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        return arm_error(
            400, "InvalidRequestContent", "The request content was invalid and could not be deserialized."
        )
    query = data.get("query")
    if not isinstance(query, str) or not query.strip():
        return _graph_error(400, "InvalidQuery", "Required property 'query' is missing.")
    scopes: list[list[str]] = []
    for key in ("subscriptions", "managementGroups"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return _graph_error(400, "InvalidRequestContent", f"'{key}' must be an array of strings.")
        scopes.append(value)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        return _graph_error(400, "InvalidRequestContent", "'options' must be an object.")
    return query, scopes[0], scopes[1], options


def _graph_query(query: str) -> tuple[list[list[Predicate]], list[Column]] | str:
    """The ``where`` clauses (each a list of alternatives) and projected columns of a query, or why not.

    The subset the simulator evaluates: ``Resources``, then ``| where`` comparisons joined by all
    ``or`` or all ``and``, ``| project`` of table columns and of ``alias = tostring(path)``,
    ``| order by id asc``. Anything else is refused.
    """
    stages = [stage.strip() for stage in query.split("|")]
    if stages[0].lower() != "resources":
        return "The simulator answers queries of the Resources table only."
    filters: list[list[Predicate]] = []
    columns: list[Column] = [("id", "id", False)]
    for stage in stages[1:]:
        word, _, rest = stage.partition(" ")
        word = word.lower()
        if word == "where":
            parts = re.split(r"\s+(or|and)\s+", rest.strip())
            joins = set(parts[1::2])
            if len(joins) > 1:
                return "Mixing 'and' and 'or' in one where is not supported by the simulator."
            predicates: list[Predicate] = []
            for text in parts[0::2]:
                match = _PREDICATE.match(text.strip())
                if match is None:
                    return f"Unsupported comparison: {text.strip()[:80]!r}."
                path = match["wrapped"] or match["bare"]
                if path.split(".")[0] not in (*GRAPH_COLUMNS, "properties"):
                    return f"Unknown column {path.split('.')[0]!r}."
                predicates.append((path, match["op"], match["literal"]))
            if joins == {"and"}:
                filters.extend([p] for p in predicates)
            else:
                filters.append(predicates)
        elif word == "project":
            columns = []
            for item in (c.strip() for c in rest.split(",")):
                computed = _COMPUTED.match(item)
                if computed is not None:
                    path = computed["path"]
                    if path.split(".")[0] not in (*GRAPH_COLUMNS, "properties"):
                        return f"Unknown column {path.split('.')[0]!r}."
                    columns.append((computed["alias"], path, True))
                elif item in GRAPH_COLUMNS:
                    columns.append((item, item, False))
                else:
                    return f"Project only {', '.join(GRAPH_COLUMNS)} and alias = tostring(path)."
            if not columns or len({name for name, _, _ in columns}) != len(columns):
                return "Project each column once."
        elif not _ORDER.match(stage):
            return f"Unsupported operator: {stage[:80]!r}."
    return filters, columns


def _graph_document(view: VmView) -> dict[str, Any]:
    """A VM as a row of Resource Graph's Resources table: the ARM model plus ``properties.extended``.

    Only what the engine's queries can name is filled in. ``osProfile`` exists only for a VM created
    from an image; ``extended.instanceView`` carries the guest-reported computer name and the power
    state (fields-slow-updates.md; Resource Graph's sample queries on powerState.code).
    """
    spec = view.spec
    props: dict[str, Any] = {
        "storageProfile": {"osDisk": {"osType": spec.os, "createOption": spec.create_option}},
        "extended": {
            "instanceView": {
                "computerName": spec.hostname,
                "powerState": {
                    "code": f"PowerState/{view.power_state}",
                    "level": "Info",
                    "displayStatus": f"VM {view.power_state}",
                },
            }
        },
    }
    if spec.create_option == "FromImage":
        props["osProfile"] = {"computerName": spec.hostname}
    return {
        "id": spec.id,
        "name": spec.name,
        "type": _VM_TYPE,
        "location": spec.location,
        "resourceGroup": spec.resource_group.lower(),
        "subscriptionId": spec.subscription_id,
        "tags": dict(spec.tags),
        "properties": props,
    }


def _column(doc: Mapping[str, Any], column: Column) -> Any:
    """A projected value: a table column as it is, or ``tostring(path)`` ("" for a missing property)."""
    _, path, as_string = column
    value: Any = doc
    for name in path.split("."):
        value = value.get(name) if isinstance(value, Mapping) else None
    if not as_string:
        return value
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _holds(clause: list[Predicate], doc: Mapping[str, Any]) -> bool:
    """Whether any comparison of the clause holds; a property the document lacks is null ("")."""
    for path, op, literal in clause:
        value: Any = doc
        for name in path.split("."):
            value = value.get(name) if isinstance(value, Mapping) else None
        text = "" if value is None else str(value)
        if op == "=~" and text.lower() == literal.lower():
            return True
        if op == "==" and text == literal:
            return True
        if op == "!~" and text.lower() != literal.lower():
            return True
        if op == "!=" and text != literal:
            return True
    return False


def _encode_token(offset: int, listing: int | None = None) -> str:
    data: dict[str, int] = {"offset": offset}
    if listing is not None:
        data["listing"] = listing
    return base64.b64encode(json.dumps(data).encode()).decode()


def _token_data(token: object) -> dict[str, Any] | None:
    if not isinstance(token, str):
        return None
    try:
        data = json.loads(base64.b64decode(token, validate=True))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _token_listing(token: object) -> int | None:
    """The listing a skip token of ours names (None: none, or not a token of ours)."""
    data = _token_data(token)
    listing = data.get("listing") if data is not None else None
    return listing if isinstance(listing, int) and not isinstance(listing, bool) else None


def _decode_token(token: object) -> int | None:
    data = _token_data(token)
    offset = data.get("offset") if data is not None else None
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return None
    return offset
