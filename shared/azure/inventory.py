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
"""

from __future__ import annotations

import asyncio
import logging
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

    async def windows_vms(self) -> AsyncIterator[VmId]:
        """Every Windows VM in scope, in id order, page by page."""
        async for row in self._rows(WINDOWS_VMS_QUERY):
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
        is a GUID (``VmId`` checked it): nothing else reaches the query.
        """
        sub = vm_id.subscription_id
        if not is_guid(sub):  # unreachable for a VmId; kept next to the quoting it guards
            raise ValueError(f"not a subscription id: {sub[:60]!r}")
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

    async def _rows(self, query: str) -> AsyncIterator[Mapping[str, Any]]:
        """Every row of ``query``, following ``$skipToken`` until the last page."""
        client = self._sdk()
        subscriptions, groups = self._scope()
        skip_token: str | None = None
        throttled = 0
        while True:
            request = QueryRequest(
                query=query,
                subscriptions=subscriptions,
                management_groups=groups,
                options=QueryRequestOptions(
                    skip_token=skip_token, top=self._page_size, result_format="objectArray"
                ),
            )
            try:
                response = await client.resources(request)
            except HttpResponseError as error:
                wait = _throttle_wait(error)
                if wait is None or throttled >= self._throttle_retries or wait > MAX_THROTTLE_WAIT_S:
                    raise _translate(error) from error
                throttled += 1
                log.info("Resource Graph throttled the inventory; retrying in %.0f s", wait)
                await asyncio.sleep(wait)
                continue
            except (ServiceRequestError, ServiceResponseError) as error:
                raise InventoryUnavailable(str(error)[:300], reason="arm-unavailable") from error
            if str(response.result_truncated).lower() == "true":
                log.warning(
                    "Resource Graph truncated a result (%s rows); some VMs are missing", response.count
                )
            throttled = 0
            for row in response.data or []:
                if isinstance(row, Mapping):
                    yield row
            next_token = response.skip_token
            if not next_token or next_token == skip_token:
                return
            skip_token = next_token


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
    message = str(error.message or error)[:500]
    if status == 429 or (status is not None and status >= 500):
        wait = wait_from_headers(response_headers(error))
        if status == 429 and wait is None:
            wait = DEFAULT_THROTTLE_WAIT_S
        reason = "throttled" if status == 429 else "arm-unavailable"
        return InventoryUnavailable(message, reason=reason, code=code, status=status, retry_after_s=wait)
    reason = "forbidden" if status in (401, 403) else "arm-error"
    return InventoryError(message, reason=reason, code=code, status=status)
