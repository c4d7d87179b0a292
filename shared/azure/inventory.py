"""The inventory: which Windows VMs are in scope, and which VM a computer name belongs to.

Resource Graph (``azure.mgmt.resourcegraph.aio``) answers both in a few paged queries where ARM
would need a list per subscription. Scope is the management group when one is set, else the target
subscriptions, else everything the identity can read. Failures become :class:`InventoryError`
whose ``reason`` is an outcome word (``throttled`` once the SDK's retries and ours are spent).

azure-core does not retry a POST answered 429 unless it carries ``Retry-After``
(Azure/azure-sdk-for-python#5412), and Resource Graph documents only its quota headers, so the
inventory itself waits ``x-ms-user-quota-resets-after`` (a few seconds) a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.core.pipeline.transport import AioHttpTransport
from azure.mgmt.resourcegraph.aio import ResourceGraphClient
from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions

from shared.azure.transport import PooledClient
from shared.model import VmId, is_guid
from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_PAGE_SIZE: Final = 1000  # Resource Graph returns at most 1,000 rows per page
MAX_THROTTLE_WAIT_S: Final = 30.0  # a longer wait is the next timer's job, not this one's
DEFAULT_THROTTLE_WAIT_S: Final = 5.0  # the quota window of guidance-for-throttled-requests.md
# ``order by id`` keeps paging stable (Resource Graph pages by skip token over a sorted result).
WINDOWS_VMS_QUERY: Final = """Resources
| where type =~ 'microsoft.compute/virtualmachines'
| where tostring(properties.storageProfile.osDisk.osType) =~ 'Windows'
| project id
| order by id asc"""
# Resource Graph has no query parameters: names are validated against this (no quote can pass)
# and only then placed between quotes. Event.Computer may be an FQDN, hence dots.
_COMPUTER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


class InventoryError(Exception):
    """A Resource Graph query failed.

    ``reason`` is an outcome word: ``throttled``, ``forbidden``, ``arm-unavailable`` or ``arm-error``.
    """

    def __init__(
        self, message: str, *, reason: str = "arm-error", code: str = "", status: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.status = status


def resolve_query(computer: str) -> str:
    """The lookup query for a computer name (validated first: this is the only guard against injection).

    Three names can match: ``osProfile.computerName`` (set from an image at provisioning; absent on
    a VM created from an attached OS disk, and never updated by a rename inside the guest), the
    guest-reported ``extended.instanceView.computerName`` (what ``Event.Computer`` carries), and the
    VM name. Windows computer names have no dots, so an FQDN also matches on its first label; VM
    names may contain dots, so the full text is tried against ``name`` too.
    """
    if not isinstance(computer, str) or not _COMPUTER_NAME.fullmatch(computer):
        raise ValueError(
            f"not a computer name (letters, digits, '-', '.'; at most 64): {str(computer)[:80]!r}"
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
            except ServiceRequestError as error:
                raise InventoryError(str(error)[:300], reason="arm-unavailable") from error
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
    headers: Mapping[str, str] = getattr(error.response, "headers", None) or {}
    resets = str(headers.get("x-ms-user-quota-resets-after") or "")
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2})(?:\.\d+)?", resets)
    if match:
        hours, minutes, seconds = (int(g) for g in match.groups())
        return float(hours * 3600 + minutes * 60 + seconds)
    retry_after = str(headers.get("Retry-After") or "")
    if retry_after.isdigit():
        return float(retry_after)
    return DEFAULT_THROTTLE_WAIT_S


def _translate(error: HttpResponseError) -> InventoryError:
    status = error.status_code
    code = str(error.error.code) if error.error is not None and error.error.code else ""
    message = str(error.message or error)[:500]
    if status == 429:
        reason = "throttled"
    elif status in (401, 403):
        reason = "forbidden"
    elif status is not None and status >= 500:
        reason = "arm-unavailable"
    else:
        reason = "arm-error"
    return InventoryError(message, reason=reason, code=code, status=status)
