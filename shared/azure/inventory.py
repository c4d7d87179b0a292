"""The inventory: which Windows VMs are in scope, and which VM a computer name belongs to.

Resource Graph (``azure.mgmt.resourcegraph.aio``) answers both in a few paged queries where ARM
would need a list per subscription. Scope is the management group when one is set, else the target
subscriptions, else everything the identity can read. Failures become :class:`InventoryError`
whose ``reason`` is an outcome word (``throttled`` once the SDK's retries and ours are spent).
Throttling and unavailability are :class:`InventoryUnavailable`, a
:class:`~shared.azure.transient.TransientError` carrying the wait the service named: the worker
defers the item by that long instead of failing it.

azure-core does not retry a POST answered 429 unless it carries ``Retry-After``
(Azure/azure-sdk-for-python#5412), and Resource Graph documents only its quota headers, so the
inventory itself waits ``x-ms-user-quota-resets-after`` (a few seconds) a bounded number of times.
A longer wait (over ``MAX_THROTTLE_WAIT_S``), from either header, is never slept in the invocation.
Every answer carries the quota (``x-ms-user-quota-remaining``), so the inventory also paces itself:
once an answer says none is left, the next query waits ``x-ms-user-quota-resets-after`` first, and
a steady run gets no 429 (guidance-for-throttled-requests.md, "Understand throttling headers").

:meth:`Inventory.list_vms` is the sweep's listing: one paged query over the whole scope (1,000 rows
a page) with what the gate needs (OS type, power state, tags) and what filters need (name,
resource group, tags), instead of two ARM list pages per 100 VMs per subscription. A last page
that says ``resultTruncated`` with fewer rows than ``totalRecords`` fails the listing
(:class:`InventoryError`, after its rows), as does a ``$skipToken`` handed back again: the VMs
it did not give are not silently left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import AioHttpTransport
from azure.mgmt.resourcegraph.aio import ResourceGraphClient
from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions

from shared.azure.transient import (
    MAX_IN_PROCESS_WAIT_S,
    BoundedRetryPolicy,
    TransientError,
    response_headers,
    wait_from_headers,
)
from shared.azure.transport import PooledClient
from shared.model import VmId, is_guid, is_host_name
from shared.settings import Settings
from shared.vm import VmFacts

log = logging.getLogger(__name__)

MAX_PAGE_SIZE: Final = 1000  # Resource Graph returns at most 1,000 rows per page
MAX_THROTTLE_WAIT_S: Final = MAX_IN_PROCESS_WAIT_S  # a longer wait is a deferral, not a sleep
DEFAULT_THROTTLE_WAIT_S: Final = 5.0  # the quota window of guidance-for-throttled-requests.md
# ``order by id`` keeps paging stable (Resource Graph pages by skip token over a sorted result).
WINDOWS_VMS_QUERY: Final = """Resources
| where type =~ 'microsoft.compute/virtualmachines'
| where tostring(properties.storageProfile.osDisk.osType) =~ 'Windows'
| project id
| order by id asc"""
# The sweep's listing: every VM in scope (Linux too: the gate reports it), with the gate's facts.
# The power state is Resource Graph's extended property (query-language.md, "Extended properties":
# ``properties.extended.instanceView.powerState.code``); the full read before any Run Command
# settles it, so a value that lags only decides which VMs are read.
LIST_VMS_QUERY: Final = """Resources
| where type =~ 'microsoft.compute/virtualmachines'
| project id, name, resourceGroup, subscriptionId, location, tags,
    osType = tostring(properties.storageProfile.osDisk.osType),
    powerState = tostring(properties.extended.instanceView.powerState.code)
| order by id asc"""
SUBSCRIPTIONS_QUERY: Final = """ResourceContainers
| where type =~ 'microsoft.resources/subscriptions'
| project subscriptionId"""
# How long a management group's answer about one subscription is trusted (a sweep asks per VM).
SCOPE_CACHE_S: Final = 60.0
TENANT_SCOPE: Final = "tenant"


class InventoryError(Exception):
    """A Resource Graph query failed.

    ``reason`` is an outcome word: ``throttled``, ``forbidden``, ``arm-unavailable`` or ``arm-error``.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "arm-error",
        code: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.status = status
        self.retry_after_s = retry_after_s


class InventoryUnavailable(InventoryError, TransientError):
    """Resource Graph throttled (``throttled``) or could not answer (``arm-unavailable``) for now;
    ``retry_after_s`` is the wait it named (quota reset or ``Retry-After``), None if it named none."""


def resolve_query(computer: str) -> str:
    """The lookup query for a computer name (validated first: this is the only guard against injection).

    Three names can match: ``osProfile.computerName`` (set from an image at provisioning; absent on
    a VM created from an attached OS disk, and never updated by a rename inside the guest), the
    guest-reported ``extended.instanceView.computerName`` (what ``Event.Computer`` carries), and the
    VM name. Windows computer names have no dots, so an FQDN also matches on its first label; VM
    names may contain dots, so the full text is tried against ``name`` too.

    Resource Graph has no query parameters: the name must be a host name (``is_host_name``: no
    quote can pass) before it is placed between quotes. ``Event.Computer`` is the FQDN of a
    domain-joined VM: labels of up to 63 characters, 253 in all (RFC 1123), which can exceed 64.
    """
    if not is_host_name(computer):
        raise ValueError(
            "not a computer name (a host name: labels of letters, digits and inner hyphens, "
            f"at most 63 each, joined by dots): {str(computer)[:80]!r}"
        )
    names = list(dict.fromkeys([computer.split(".")[0], computer]))
    tests = [
        f"tostring(properties.osProfile.computerName) =~ '{names[0]}'",
        f"tostring(properties.extended.instanceView.computerName) =~ '{names[0]}'",
    ]
    tests += [f"name =~ '{name}'" for name in names]
    return (
        "Resources\n"
        "| where type =~ 'microsoft.compute/virtualmachines'\n"
        f"| where {' or '.join(tests)}\n"
        "| project id\n"
        "| order by id asc"
    )


class Inventory(PooledClient[ResourceGraphClient]):
    """Paged Resource Graph queries over one client and connection pool."""

    def __init__(
        self,
        credential: AsyncTokenCredential,
        settings: Settings,
        *,
        page_size: int = MAX_PAGE_SIZE,
        session: aiohttp.ClientSession | None = None,
        throttle_retries: int = 3,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        if throttle_retries < 0:
            raise ValueError("throttle_retries must be 0 or more")
        self._credential = credential
        super().__init__(settings, session)
        self._page_size = page_size
        self._throttle_retries = throttle_retries
        self._quota_back_at = 0.0  # monotonic time before which the quota is known to be spent
        self._in_group: dict[str, tuple[bool, float]] = {}  # subscription -> (in the group, when)
        self._asking: dict[str, asyncio.Lock] = {}
        self.queries = 0  # Resource Graph requests sent (the benchmark reports them)
        self.throttled = 0  # of which answered 429

    def _make_client(self, transport: AioHttpTransport) -> ResourceGraphClient:
        return ResourceGraphClient(
            self._credential,
            base_url=self._settings.arm_endpoint,
            credential_scopes=[self._settings.cloud.arm_scope],
            transport=transport,
            retry_policy=BoundedRetryPolicy(max_wait_s=MAX_THROTTLE_WAIT_S),
        )

    def _scope(self) -> tuple[list[str] | None, list[str] | None]:
        """(subscriptions, management groups); neither means the tenant, all the identity can read."""
        if self._settings.management_group:
            return None, [self._settings.management_group]
        if self._settings.subscriptions:
            return list(self._settings.subscriptions), None
        return None, None

    def listing_scope(self) -> list[str]:
        """What one listing covers, as the sweep reports a listing error: the subscriptions given,
        ``managementGroups/<id>``, or ``tenant`` (everything the identity can read). A failed query
        is a failure of all of it: Resource Graph does not say which subscriptions it did not reach."""
        subscriptions, groups = self._scope()
        if groups:
            return [f"managementGroups/{group}" for group in groups]
        return list(subscriptions or [TENANT_SCOPE])

    async def unlisted_subscriptions(self) -> list[str]:
        """The subscriptions of the scope that Resource Graph does not see (a typo, or no read access):
        Resource Graph answers for the subscriptions it can read and says nothing of the others."""
        subscriptions, _ = self._scope()
        if not subscriptions:
            return []
        seen = {str(row.get("subscriptionId", "")).lower() async for row in self._rows(SUBSCRIPTIONS_QUERY)}
        return [sub for sub in subscriptions if sub.lower() not in seen]

    async def group_subscriptions(self) -> list[str]:
        """The subscriptions (lower case) Resource Graph sees in or under ``MANAGEMENT_GROUP_ID``;
        empty without a management group.

        The CLI asks it once before any VM, so that a group Resource Graph refuses (it does not
        exist, or the identity cannot read it) or holds nothing the identity can read is said at
        once, instead of a sweep of nothing or a ``scope-unknown`` per VM. Each subscription found
        is remembered as in the group for the scope check (``in_scope``, for ``SCOPE_CACHE_S``):
        the same ``ResourceContainers`` question, asked once for all of them. The query projects no
        ``id``, so Resource Graph answers one page of at most 1,000 rows (work-with-data.md, "Paging
        results"): a larger group's other subscriptions are asked one by one, as before.
        """
        _, groups = self._scope()
        if not groups:
            return []
        found: list[str] = []
        async for row in self._rows(SUBSCRIPTIONS_QUERY):
            sub = str(row.get("subscriptionId", "")).lower()
            if is_guid(sub) and sub not in found:
                found.append(sub)
        now = time.monotonic()
        for sub in found:
            self._in_group[sub] = (True, now)
        return found

    async def list_vms(self) -> AsyncIterator[VmFacts]:
        """Every VM in scope, in id order, page by page: id, OS type, power state, tags, location.

        ``agent_ready`` is unknown (None): the gate reads the VM before any Run Command.
        """
        async for row in self._rows(LIST_VMS_QUERY, complete=True):
            facts = _listed_facts(row)
            if facts is not None:
                yield facts

    async def windows_vms(self) -> AsyncIterator[VmId]:
        """Every Windows VM in scope, in id order, page by page."""
        async for row in self._rows(WINDOWS_VMS_QUERY, complete=True):
            vm = _vm_id(row)
            if vm is not None:
                yield vm

    async def resolve_computer(self, computer: str) -> list[VmId]:
        """The VMs in scope whose computer name (or VM name) is ``computer``; several when names repeat.

        Raises ValueError for anything that is not a plain host name, before any query is built.
        """
        query = resolve_query(computer)
        found: list[VmId] = []
        async for row in self._rows(query):
            vm = _vm_id(row)
            if vm is not None and vm not in found:
                found.append(vm)
        return found

    async def in_scope(self, vm_id: VmId) -> bool:
        """Whether the VM's subscription is in the configured scope (``shared.scope``, management group).

        Management groups hold subscriptions, and a resource is in a group exactly when its
        subscription is, so the question goes to ``ResourceContainers`` (subscriptions appear there
        at once, where a VM just created may take a while to reach ``Resources``). The subscription
        is a GUID (``VmId`` checked it): nothing else reaches the query. An answer is kept for
        ``SCOPE_CACHE_S`` (a sweep asks for every VM; Resource Graph's quota is ~15 queries per 5 s).
        """
        sub = vm_id.subscription_id
        if not is_guid(sub):  # unreachable for a VmId; kept next to the quoting it guards
            raise ValueError(f"not a subscription id: {sub[:60]!r}")
        key = sub.lower()
        # One question per subscription at a time: the checks of a sweep's other VMs wait for it.
        async with self._asking.setdefault(key, asyncio.Lock()):
            known = self._in_group.get(key)
            if known is not None and time.monotonic() - known[1] < SCOPE_CACHE_S:
                return known[0]
            found = await self._subscription_in_scope(sub)
            self._in_group[key] = (found, time.monotonic())
            return found

    async def _subscription_in_scope(self, sub: str) -> bool:
        query = (
            "ResourceContainers\n"
            "| where type =~ 'microsoft.resources/subscriptions'\n"
            f"| where subscriptionId =~ '{sub}'\n"
            "| project subscriptionId"
        )
        async for row in self._rows(query):
            if str(row.get("subscriptionId", "")).lower() == sub.lower():
                return True
        return False

    async def _rows(self, query: str, *, complete: bool = False) -> AsyncIterator[Mapping[str, Any]]:
        """Every row of ``query``, following ``$skipToken`` until the last page.

        ``complete``: the query projects ``id``, so Resource Graph pages all of it, and a last page
        marked ``resultTruncated`` lost rows (an error). A query without ``id`` is one page of at most
        1,000 rows, marked so when there were more (work-with-data.md): its callers expect that."""
        client = self._sdk()
        subscriptions, groups = self._scope()
        skip_token: str | None = None
        throttled = 0
        rows = 0  # rows given so far, over every page
        followed: set[str] = set()  # every $skipToken asked for: one handed back again is a loop
        while True:
            quota_wait = self._quota_back_at - time.monotonic()
            if quota_wait > 0:  # the last answer said the quota is spent: wait for it, not for a 429
                log.info("Resource Graph quota spent; next query in %.1f s", quota_wait)
                await asyncio.sleep(min(quota_wait, MAX_THROTTLE_WAIT_S))
            request = QueryRequest(
                query=query,
                subscriptions=subscriptions,
                management_groups=groups,
                options=QueryRequestOptions(
                    skip_token=skip_token, top=self._page_size, result_format="objectArray"
                ),
            )
            self.queries += 1
            try:
                answer: Any = await client.resources(request, cls=_with_headers)
            except HttpResponseError as error:
                if error.status_code == 429:
                    self.throttled += 1
                wait = _throttle_wait(error)
                if wait is None or throttled >= self._throttle_retries or wait > MAX_THROTTLE_WAIT_S:
                    raise _translate(error) from error
                throttled += 1
                log.info("Resource Graph throttled the inventory; retrying in %.0f s", wait)
                await asyncio.sleep(wait)
                continue
            except (ServiceRequestError, ServiceResponseError) as error:
                raise InventoryUnavailable(str(error)[:300], reason="arm-unavailable") from error
            response, headers = answer
            self._note_quota(headers)
            throttled = 0
            for row in response.data or []:
                if isinstance(row, Mapping):
                    rows += 1
                    yield row
            next_token = response.skip_token
            if next_token and (next_token == skip_token or next_token in followed):
                # The page it was asked for, again: following it would loop, stopping would
                # quietly leave out every VM after it.
                raise InventoryError(
                    f"Resource Graph gave a $skipToken again after {rows} rows; the rest is unlisted",
                    reason="arm-error",
                    code="SkipTokenRepeated",
                )
            if not next_token:
                if complete:
                    _check_complete(response, rows)
                return
            skip_token = next_token
            followed.add(next_token)

    def _note_quota(self, headers: Mapping[str, str]) -> None:
        """Remember when the quota is back if this answer says none is left."""
        remaining = str(headers.get("x-ms-user-quota-remaining", "")).strip()
        if remaining.isdigit() and int(remaining) == 0:
            wait = wait_from_headers(
                {"x-ms-user-quota-resets-after": headers.get("x-ms-user-quota-resets-after", "")}
            )
            self._quota_back_at = time.monotonic() + (DEFAULT_THROTTLE_WAIT_S if wait is None else wait)


def _check_complete(response: Any, rows: int) -> None:
    """After the last page: a result Resource Graph says it truncated, with fewer rows than it
    matched, is a failed listing (work-with-data.md, "Paging results": ``resultTruncated`` says
    records were not returned, and then no ``$skipToken`` follows), not a shorter estate."""
    if str(response.result_truncated).lower() != "true":
        return
    total = response.total_records
    if isinstance(total, int) and rows >= total:
        return
    log.error("Resource Graph truncated a result: %s of %s rows", rows, total)
    raise InventoryError(
        f"Resource Graph truncated the result: {rows} of {total} rows given, no further page",
        reason="arm-error",
        code="ResultTruncated",
    )


def _with_headers(pipeline_response: Any, deserialized: Any, _: Any) -> tuple[Any, Mapping[str, str]]:
    """``cls`` of the SDK's ``resources``: the answer and its headers (the quota is in them)."""
    headers = getattr(pipeline_response.http_response, "headers", None)
    return deserialized, headers if isinstance(headers, Mapping) else {}


def _listed_facts(row: Mapping[str, Any]) -> VmFacts | None:
    """A row of :data:`LIST_VMS_QUERY` as the gate's facts (None for an unreadable id)."""
    vm = _vm_id(row)
    if vm is None:
        return None
    os_type = str(row.get("osType") or "") or None
    code = str(row.get("powerState") or "")
    power = code.split("/", 1)[1] if code.lower().startswith("powerstate/") else None
    raw_tags = row.get("tags")
    tags = {str(k): str(v) for k, v in raw_tags.items()} if isinstance(raw_tags, Mapping) else {}
    return VmFacts(
        vm_id=vm,
        os_type=os_type,
        power_state=power or None,
        agent_ready=None,
        tags=tags,
        location=str(row.get("location") or ""),
    )


def _vm_id(row: Mapping[str, Any]) -> VmId | None:
    vm = VmId.try_parse(row.get("id"))
    if vm is None:
        log.warning("Resource Graph gave an unreadable VM id: %r", str(row.get("id"))[:200])
    return vm


def _throttle_wait(error: HttpResponseError) -> float | None:
    """Seconds until the quota resets for a 429 (None for any other error)."""
    if error.status_code != 429:
        return None
    # azure-core types ``response`` as its common base, which does not declare ``headers``.
    wait = wait_from_headers(response_headers(error))
    return DEFAULT_THROTTLE_WAIT_S if wait is None else wait


def _translate(error: HttpResponseError) -> InventoryError:
    status = error.status_code
    code = str(error.error.code) if error.error is not None and error.error.code else ""
    said = _service_words(error)
    message = (said + "\n" if said else "") + str(error.message or error)[:500]
    if status == 429 or (status is not None and status >= 500):
        wait = wait_from_headers(response_headers(error))
        if status == 429 and wait is None:
            wait = DEFAULT_THROTTLE_WAIT_S
        reason = "throttled" if status == 429 else "arm-unavailable"
        return InventoryUnavailable(message, reason=reason, code=code, status=status, retry_after_s=wait)
    reason = "forbidden" if status in (401, 403) else "arm-error"
    return InventoryError(message, reason=reason, code=code, status=status)


def _service_words(error: HttpResponseError) -> str:
    """What the service said, its reason first, on one line ("" when its answer has no details).

    Resource Graph's top-level ``message`` is only "Please provide below info when asking for
    support: timestamp = …, correlationId = …"; its reason ("… does not have authorization … over
    scope …", "Query is invalid …", "Client application has been throttled …") is in ``details``
    (Azure/azure-powershell src/ResourceGraph/ResourceGraph.Test/ScenarioTests/ResourceGraphQueryTests.ps1,
    ``Search-AzureRmGraph-QueryError``). The SDK's text starts with the top message, so a one-line
    report of it said nothing an operator could act on: this line goes first, the SDK's whole text
    after it (what -v shows; the correlation id is for a support request).
    """
    odata = error.error
    details = [d for d in (getattr(odata, "details", None) or []) if getattr(d, "message", None)]
    said = [f"({d.code}) {d.message}" if d.code else str(d.message) for d in details]
    return " ".join(" ".join(text.split()) for text in said)
