"""ARM network reads through ``azure.mgmt.network.aio``: what a VM's path to the KMS is made of.

For one VM the check reads its primary NIC (``NetworkInterfaces_Get``), the NIC's effective route
table (``NetworkInterfaces_GetEffectiveRouteTable``, a POST answered as a long-running operation),
and, cached for the whole run because many VMs share them, the NIC's subnet, the subnet's route
table, the load balancers whose backend pools hold the NIC and the NIC's and the subnet's NSGs.
shared/network_path.py judges what was read; nothing here decides.

Why effective routes and not Network Watcher's next hop (``NetworkWatchers_GetNextHop``):
docs/troubleshooting.md, "The path to the KMS". In short: one call per NIC answers for every KMS
address at once (next hop is one call per address), it needs no Network Watcher in the VM's region
and no rights on one (next hop needs ``Microsoft.Network/networkWatchers/nextHop/action`` on the
watcher, in NetworkWatcherRG), and both are long-running operations of the same latency.

The SDK is imported on first use, so ``import function_app`` does not pay for it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, HttpResponseError
from azure.core.pipeline.transport import AioHttpTransport

from shared.azure.transient import BoundedRetryPolicy
from shared.azure.transport import SubscriptionClients, sdk_json
from shared.kms_endpoints import kms_of
from shared.network_path import PathFacts, PathVerdict, judge, unknown
from shared.settings import Settings
from shared.vm import VmFacts

if TYPE_CHECKING:
    from azure.mgmt.network.aio import NetworkManagementClient

log = logging.getLogger(__name__)

_ID = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
    r"(?P<type>[^/]+)/(?P<name>[^/]+)(?:/(?P<child_type>[^/]+)/(?P<child>[^/]+))?/?",
    re.IGNORECASE,
)


class NetworkUnreadable(Exception):
    """A read failed; the verdict becomes ``unknown`` with this text."""


class NetworkGateway(SubscriptionClients["NetworkManagementClient"]):
    """One network client per subscription over one session; caches shared resources per run."""

    def __init__(self, credential: AsyncTokenCredential, settings: Settings) -> None:
        super().__init__(settings)
        self._credential = credential
        self._kms = kms_of(settings.cloud.name)
        self._cache: dict[str, asyncio.Task[Mapping[str, Any]]] = {}
        self.checks = 0

    def _make_client(self, subscription_id: str, transport: AioHttpTransport) -> NetworkManagementClient:
        from azure.mgmt.network.aio import NetworkManagementClient  # lazy: import time of function_app

        return NetworkManagementClient(
            self._credential,
            subscription_id,
            retry_policy=BoundedRetryPolicy(),
            **self._arm_options(transport),
        )

    async def close(self) -> None:
        for task in self._cache.values():
            task.cancel()
        self._cache = {}
        await super().close()

    async def path(self, vm: VmFacts) -> PathVerdict:
        """The VM's path to its cloud's KMS, judged; never raises for an ARM problem."""
        if not vm.nic_ids:
            return unknown("the VM model names no network interface")
        nic_id = vm.nic_ids[0]
        self.checks += 1
        try:
            async with asyncio.timeout(self._settings.arm_timeout_s):
                facts = await self._facts(nic_id)
        except NetworkUnreadable as error:
            return unknown(str(error), nic_id=nic_id)
        except TimeoutError:
            return unknown(f"no answer within {self._settings.arm_timeout_s:g} s", nic_id=nic_id)
        return judge(facts, self._kms)

    async def _facts(self, nic_id: str) -> PathFacts:
        nic_ref = _parse(nic_id)
        client = self._client(nic_ref["sub"])
        # Both at once, but a failure is told in a fixed order (the NIC's read first), so that the
        # note of an unknown path is the same from run to run, whichever answer came first.
        answers: tuple[Mapping[str, Any] | BaseException, ...] = await asyncio.gather(
            self._call(
                f"read of {nic_ref['name']}",
                lambda: client.network_interfaces.get(nic_ref["rg"], nic_ref["name"]),
            ),
            self._effective_routes(client, nic_ref["rg"], nic_ref["name"]),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        nic, routes = (cast(Mapping[str, Any], answer) for answer in answers)
        props = _obj(nic.get("properties"))
        configs = [_obj(_obj(c).get("properties")) for c in _list(props.get("ipConfigurations"))]
        primary = next((c for c in configs if c.get("primary")), configs[0] if configs else {})
        subnet_id = str(_obj(primary.get("subnet")).get("id") or "")
        if not subnet_id:
            raise NetworkUnreadable(f"network interface {nic_ref['name']} names no subnet")
        subnet = await self._shared(subnet_id, self._subnet)
        subnet_props = _obj(subnet.get("properties"))
        table_id = str(_obj(subnet_props.get("routeTable")).get("id") or "")
        lb_ids = sorted(
            {
                _lb_of(str(_obj(pool).get("id") or ""))
                for c in configs
                for pool in _list(c.get("loadBalancerBackendAddressPools"))
            }
            - {""}
        )
        nsg_ids = [
            str(_obj(props.get("networkSecurityGroup")).get("id") or ""),
            str(_obj(subnet_props.get("networkSecurityGroup")).get("id") or ""),
        ]
        table, lbs, nsgs = await asyncio.gather(
            self._shared(table_id, self._get) if table_id else _none(),
            asyncio.gather(*(self._shared(lb, self._get) for lb in lb_ids)),
            asyncio.gather(*(self._shared(nsg, self._get) for nsg in nsg_ids if nsg)),
        )
        return PathFacts(
            nic=nic,
            subnet=subnet,
            routes=[_obj(r) for r in _list(routes.get("value"))],
            route_table=table,
            load_balancers=list(lbs),
            nsgs=list(nsgs),
        )

    async def _effective_routes(
        self, client: NetworkManagementClient, rg: str, name: str
    ) -> Mapping[str, Any]:
        async def run() -> Any:
            poller = await client.network_interfaces.begin_get_effective_route_table(rg, name)
            return await poller.result()

        return await self._call(f"effective routes of {name}", run)

    async def _shared(
        self, resource_id: str, read: Callable[[str], Awaitable[Mapping[str, Any]]]
    ) -> Mapping[str, Any]:
        """One read per resource per run, however many VMs share it (concurrent callers wait on one)."""
        key = resource_id.lower()
        task = self._cache.get(key)
        if task is None:
            task = asyncio.ensure_future(read(resource_id))
            self._cache[key] = task
        return await asyncio.shield(task)

    async def _subnet(self, subnet_id: str) -> Mapping[str, Any]:
        ref = _parse(subnet_id)
        client = self._client(ref["sub"])
        return await self._call(
            f"read of subnet {ref['child']}", lambda: client.subnets.get(ref["rg"], ref["name"], ref["child"])
        )

    async def _get(self, resource_id: str) -> Mapping[str, Any]:
        ref = _parse(resource_id)
        client = self._client(ref["sub"])
        kind, rg, name = ref["type"].lower(), ref["rg"], ref["name"]
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "routetables": lambda: client.route_tables.get(rg, name),
            "loadbalancers": lambda: client.load_balancers.get(rg, name),
            "networksecuritygroups": lambda: client.network_security_groups.get(rg, name),
        }
        if kind not in calls:
            raise NetworkUnreadable(f"not a resource the check reads: {resource_id[:200]}")
        return await self._call(f"read of {name}", calls[kind])

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Mapping[str, Any]:
        try:
            answer = await call()
        except HttpResponseError as error:
            status = error.status_code
            code = error.error.code if error.error is not None and error.error.code else ""
            if status in (401, 403):
                raise NetworkUnreadable(
                    f"{what}: forbidden ({code or status}); see the role in infra/"
                ) from error
            raise NetworkUnreadable(f"{what}: HTTP {status} {code}".strip()) from error
        except AzureError as error:
            # ServiceRequestError, and ServiceResponseError (a connection dropped mid-answer, once the
            # retries are spent) too: "never raises for an ARM problem".
            raise NetworkUnreadable(f"{what}: {str(error)[:200]}") from error
        try:
            return sdk_json(answer)
        except TypeError as error:  # an answer the SDK gave in no shape we read; not a bug of ours
            raise NetworkUnreadable(f"{what}: {error}") from error


async def _none() -> None:
    return None


def _parse(resource_id: str) -> dict[str, str]:
    match = _ID.fullmatch(resource_id)
    if match is None:
        raise NetworkUnreadable(f"not a Microsoft.Network resource id: {resource_id[:200]}")
    return {k: v or "" for k, v in match.groupdict().items()}


def _lb_of(pool_id: str) -> str:
    head, sep, _ = pool_id.partition("/backendAddressPools/")
    return head if sep else ""


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
