"""ARM compute as the engine meets it: VM models, instance views, paged lists and Run Command.

Shapes follow the Azure REST API specs' examples (Azure/azure-rest-api-specs, ComputeRP stable
2025-04-01: VirtualMachine_Get_InstanceView.json, VirtualMachine_Get_WithVMSizeProperties.json,
VirtualMachine_ListAll_MaximumSet_Gen.json, runCommandExamples/VirtualMachineRunCommand.json). The
error bodies are the ones Azure is seen to send (docs/simulator.md lists each with its source).

There is no HTTP here: :meth:`Compute.handle` maps (method, path, query, body) to an
:class:`ArmResponse` under one lock, so the server stays a thin adapter and the test hooks (called
from another thread) see a consistent estate. Time is compressed: a Run Command takes
``latency_s`` seconds of wall clock instead of Azure's 20 s or more, and its completion is computed
from timestamps when someone looks, never by timers.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode

from simulator.estate import POWER_STATES, Estate, VmSpec
from simulator.faults import FaultInjector, ThrottleAnswer
from simulator.guest import DETECT_FIRST_LINE, REMEDIATE_FIRST_LINE, WindowsGuest, nt_version
from simulator.throttle import ArmVerdict, Throttle

OUTPUT_LIMIT_BYTES: Final = 4096
CONFLICT_MESSAGE: Final = (
    "Run command extension execution is in progress. "
    "Please wait for completion before invoking a run command."
)
NOT_RUNNING_MESSAGE: Final = "The operation requires the VM to be running (or set to run)."
COMMAND_OS: Final[Mapping[str, str]] = {"RunPowerShellScript": "Windows", "RunShellScript": "Linux"}
# The displayStatus next to each PowerState/<code> (``VM running`` is the spec example's; the others
# follow its pattern, a guess noted in docs/simulator.md).
POWER_DISPLAY: Final[Mapping[str, str]] = {state: f"VM {state}" for state in POWER_STATES}
_AGENT_VERSION: Final[Mapping[str, str]] = {"Windows": "2.7.41491.1102", "Linux": "2.10.0.8"}
_CREATED: Final = "2024-05-14T09:12:33.4476541+00:00"
# The principal named in throttling messages (ARM names the caller's object id; one identity here).
THROTTLED_ACTOR: Final = "5b7e2c1a-0d4f-4e8a-9c3b-6f1d2e3a4b5c"
# Compute's policy (operation group) of each route, for the armThrottling fault: the names are
# Compute's (troubleshooting-throttling-errors.md; public captures show a VM GET answered with
# "Microsoft.Compute/LowCostGet3Min;3998,Microsoft.Compute/LowCostGet30Min;31997"); which policy
# covers which route is a guess (lists as high-cost reads, a Run Command as a VM write). Only the
# three-minute policies are modelled, not the thirty-minute ones beside them.
COMPUTE_POLICIES: Final[Mapping[str, str]] = {
    "get": "LowCostGet3Min",
    "instance_view": "LowCostGet3Min",
    "operation": "LowCostGet3Min",
    "list_all": "HighCostGet3Min",
    "list_by_resource_group": "HighCostGet3Min",
    "run_command": "PutVM3Min",
}
REMAINING_RESOURCE: Final = "x-ms-ratelimit-remaining-resource"
AGENT_ERROR: Final = "VMAgentStatusCommunicationError"
# An operation that failed inside the platform (fault ``operationFailed``); widely seen ARM wording.
EXECUTION_ERROR: Final = {
    "code": "InternalExecutionError",
    "message": "An internal execution error occurred. Please retry later.",
}
_NOISE_LINE: Final = "WARNING: transcript of an unrelated module, line {:05d}, printed after the result."


@dataclass(frozen=True, slots=True)
class ArmResponse:
    """One HTTP answer: status, JSON body (or none) and extra headers."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _os_disk(vm: VmState) -> tuple[str, str]:
    """The OS disk's name and id as a VM GET shows them (storageProfile.osDisk.name and
    .managedDisk.id: VirtualMachine_Get.json in azure-rest-api-specs); a swap gives the next number."""
    spec = vm.spec
    name = f"{spec.name}_OsDisk_{1 + vm.os_disk_swaps}_{uuid.uuid5(uuid.NAMESPACE_URL, spec.key).hex}"
    rg_id = f"/subscriptions/{spec.subscription_id}/resourceGroups/{spec.resource_group}"
    return name, f"{rg_id}/providers/Microsoft.Compute/disks/{name}"


def arm_error(status: int, code: str, message: str) -> ArmResponse:
    """The ARM error envelope ``{"error": {"code", "message"}}`` (CloudError)."""
    return ArmResponse(status, {"error": {"code": code, "message": message}})


@dataclass(slots=True)
class Operation:
    """One accepted Run Command, from POST to its terminal status."""

    id: str
    vm_key: str
    subscription_id: str
    location: str
    started: float
    ends: float
    started_at: datetime
    command_id: str
    script: tuple[str, ...]
    parameters: tuple[dict[str, str], ...]
    agent_ok: bool
    status: str = "InProgress"
    output: str = ""
    error: dict[str, str] | None = None
    # Faults: runs far past any client deadline; or the POST's answer was a 5xx although it was
    # accepted (the client never learns the operation id); or it ends Failed, before or after the
    # script ran in the guest.
    hung: bool = False
    ghost: bool = False
    fail: str | None = None  # None | "before-script" | "after-script"

    @property
    def abandoned(self) -> bool:
        """A fault made the client give up on this operation while it still runs."""
        return self.hung or self.ghost

    @property
    def ended_at(self) -> datetime:
        return self.started_at + timedelta(seconds=self.ends - self.started)


@dataclass(frozen=True, slots=True)
class VmView:
    """A VM as the read-only services (Resource Graph, Log Analytics) see it at one moment."""

    spec: VmSpec
    power_state: str
    channel: str | None  # the guest's licensing channel now; None for Linux


@dataclass(slots=True)
class VmState:
    """A VM's live state: power, agent, guest, and what Run Command did to it."""

    spec: VmSpec
    power_state: str
    agent_ready: bool
    guest: WindowsGuest | None
    initial: tuple[object, ...] | None
    busy_pending: float
    foreign_until: float = 0.0
    running: Operation | None = None
    deleted: bool = False
    run_commands: int = 0
    conflicts: int = 0
    live_conflicts: int = 0  # 409s because one of the caller's own live (not abandoned) commands ran
    max_concurrent: int = 0
    flapping: bool = False  # fault agentFlap: the agent alternates Ready / Not Ready
    flap_phase: float = 0.0
    os_disk_swaps: int = 0  # test hook swap_os_disk: each swap gives the VM a new OS disk id
    log: list[dict[str, Any]] = field(default_factory=list)


class Compute:
    """The simulated ``Microsoft.Compute`` of an estate; thread-safe."""

    def __init__(
        self,
        estate: Estate,
        *,
        latency_s: float = 0.05,
        page_size: int = 100,
        clock: Callable[[], float] = time.monotonic,
        faults: FaultInjector | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        if latency_s < 0:
            raise ValueError("latency_s must be 0 or more")
        if page_size < 1:
            raise ValueError("page_size must be 1 or more")
        self.estate = estate
        self.latency_s = latency_s
        self.page_size = page_size
        self._clock = clock
        self._started = clock()
        self.faults = faults if faults is not None else FaultInjector(estate.faults, clock=clock)
        # ARM's documented budgets (and Resource Graph's quota, which the server's graph asks here).
        self.throttle = (
            throttle
            if throttle is not None
            else Throttle(estate.throttling, cloud=estate.cloud, latency_s=latency_s, clock=clock)
        )
        self._lock = threading.Lock()
        self._vms: dict[str, VmState] = {}
        self._by_sub: dict[str, list[str]] = {sub.lower(): [] for sub in estate.subscriptions}
        self._by_rg: dict[tuple[str, str], list[str]] = {}
        self._operations: dict[str, Operation] = {}
        self.requests: Counter[str] = Counter()
        for spec in estate.vms:
            guest = None
            if spec.guest is not None:
                guest = WindowsGuest.from_spec(spec.guest, cloud=estate.cloud, seed=spec.key)
            self._vms[spec.key] = VmState(
                spec=spec,
                power_state=spec.power_state,
                agent_ready=spec.agent_ready,
                guest=guest,
                initial=guest.licensing() if guest else None,
                busy_pending=spec.busy_seconds,
            )
            if guest is not None and self.faults.fire("agentFlap", spec.id, record=False):
                self._vms[spec.key].flapping = True
                self._vms[spec.key].flap_phase = 2 * self.faults.draw("agentFlap")
            self._by_sub.setdefault(spec.subscription_id.lower(), []).append(spec.key)
            self._by_rg.setdefault((spec.subscription_id.lower(), spec.resource_group.lower()), []).append(
                spec.key
            )

    # ------------------------------------------------------------------ HTTP-shaped entry point

    def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes, *, base_url: str
    ) -> ArmResponse:
        """Answer one authenticated ARM request."""
        parts = [p for p in path.split("/") if p]
        low = [p.lower() for p in parts]
        q = {k.lower(): v for k, v in query.items()}
        route = _route(low)
        if route is None:
            self._count("not_found")
            return arm_error(404, "NotFound", f"No route for {method} {path[:200]}")
        kind, expected_method = route
        sub = parts[1]
        # ARM throttles before the request reaches the resource provider: its documented budget
        # (simulator/throttle.py) for any request under a subscription, whatever the answer; then
        # Compute's own policies, the armThrottling fault, when it is on.
        budget = self.throttle.arm(sub, method)
        if budget is not None and not budget.allowed:
            return _with_remaining(_throttled(budget, sub), None, budget)
        if method != expected_method:
            self._count("not_found")
            return _with_remaining(
                arm_error(405, "MethodNotAllowed", f"{method} is not allowed on {path[:200]}"), None, budget
            )
        self._count(kind)
        if not q.get("api-version"):
            return _with_remaining(
                arm_error(
                    400,
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                ),
                None,
                budget,
            )
        throttle = self.faults.throttle(sub, COMPUTE_POLICIES[kind], write=expected_method != "GET")
        if throttle is not None and not throttle.allowed:
            return _with_remaining(_policy_throttled(throttle), throttle, budget)
        if self.faults.fire("serverError", path[:200]):
            error = server_error(self.faults.draw("serverError"), sub, self.latency_s)
            if kind == "run_command" and self.faults.draw("serverError") < self.faults.plan.after_accept:
                # The resource provider accepted the command, but the caller gets the 5xx.
                with self._lock:
                    self._dispatch(
                        kind, path, parts, low, query, q, body, base_url, self._clock(), ghost=True
                    )
            return _with_remaining(error, throttle, budget)
        with self._lock:
            answer = self._dispatch(kind, path, parts, low, query, q, body, base_url, self._clock())
        return _with_remaining(answer, throttle, budget)

    def _dispatch(
        self,
        kind: str,
        path: str,
        parts: list[str],
        low: list[str],
        query: Mapping[str, str],
        q: Mapping[str, str],
        body: bytes,
        base_url: str,
        now: float,
        *,
        ghost: bool = False,
    ) -> ArmResponse:
        """Answer a routed request (the caller holds the lock)."""
        if kind == "operation":
            return self._operation(parts[7], monitor=q.get("monitor", "").lower() == "true", now=now)
        sub = parts[1]
        if sub.lower() not in self._by_sub:
            return arm_error(404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found.")
        if kind == "list_all":
            keys = self._by_sub[sub.lower()]
            return self._list(keys, path, query, q, base_url, now)
        rg = parts[3]
        if (sub.lower(), rg.lower()) not in self._by_rg:
            return arm_error(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        if kind == "list_by_resource_group":
            return self._list(self._by_rg[(sub.lower(), rg.lower())], path, query, q, base_url, now)
        vm = self._vms.get("/".join(["", *low[:8]]))
        if vm is None or vm.deleted:
            name = parts[7]
            return arm_error(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{rg}' "
                "was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        if kind == "get":
            expand = q.get("$expand", "").lower() == "instanceview"
            return ArmResponse(200, self._model(vm, now, instance_view=expand))
        if kind == "instance_view":
            return ArmResponse(200, self._instance_view(vm, now))
        return self._run_command(vm, body, q["api-version"], base_url, now, ghost=ghost)

    # ------------------------------------------------------------------ test hooks (any thread)

    def delete_vm(self, vm_id: str) -> None:
        with self._lock:
            self._vm(vm_id).deleted = True

    def set_power_state(self, vm_id: str, state: str) -> None:
        if state not in POWER_DISPLAY:
            raise ValueError(f"power state must be one of {', '.join(POWER_DISPLAY)}")
        with self._lock:
            self._vm(vm_id).power_state = state

    def set_agent_ready(self, vm_id: str, ready: bool) -> None:
        with self._lock:
            self._vm(vm_id).agent_ready = ready

    def swap_os_disk(self, vm_id: str) -> str:
        """Swap the VM's OS disk (or re-image it): a new ``storageProfile.osDisk.managedDisk.id``, and
        the guest back in the estate's state, as a disk made from the same image would be. Gives
        the new disk id."""
        with self._lock:
            vm = self._vm(vm_id)
            vm.os_disk_swaps += 1
            if vm.spec.guest is not None and vm.guest is not None:
                vm.guest = WindowsGuest.from_spec(vm.spec.guest, cloud=vm.guest.cloud, seed=vm.spec.key)
            return _os_disk(vm)[1]

    def set_kms_reachable(self, vm_id: str, reachable: bool) -> None:
        with self._lock:
            guest = self._vm(vm_id).guest
            if guest is None:
                raise ValueError(f"{vm_id} has no Windows guest")
            guest.kms_reachable = reachable

    def set_busy(self, vm_id: str, seconds: float) -> None:
        """A foreign Run Command starts now on the VM and runs for ``seconds``."""
        with self._lock:
            vm = self._vm(vm_id)
            vm.busy_pending = 0.0
            vm.foreign_until = self._clock() + seconds

    def guest(self, vm_id: str) -> WindowsGuest | None:
        """The live guest object (read it, don't share it across threads while the server runs)."""
        with self._lock:
            return self._vm(vm_id).guest

    def run_log(self, vm_id: str) -> list[dict[str, Any]]:
        """Every Run Command accepted on the VM: operation id, script kind, parameters, final status."""
        with self._lock:
            vm = self._vm(vm_id)
            self._settle(vm, self._clock())
            return [dict(entry) for entry in vm.log]

    def run_logs(self) -> dict[str, list[dict[str, Any]]]:
        """:meth:`run_log` of every VM that ran anything, deleted VMs included, keyed by estate id."""
        with self._lock:
            now = self._clock()
            out: dict[str, list[dict[str, Any]]] = {}
            for vm in self._vms.values():
                self._settle(vm, now)
                if vm.log:
                    out[vm.spec.id] = [dict(entry) for entry in vm.log]
            return out

    def vanished(self) -> dict[str, str]:
        """VMs gone or stopped since the start (hooks, faults): id → ``deleted`` or the power state."""
        with self._lock:
            out: dict[str, str] = {}
            for vm in self._vms.values():
                if vm.deleted:
                    out[vm.spec.id] = "deleted"
                elif vm.power_state != vm.spec.power_state:
                    out[vm.spec.id] = vm.power_state
            return out

    def counters(self) -> dict[str, Any]:
        """Requests per route kind, and per VM: Run Commands started, 409 conflicts (all, and those
        against the caller's own live command), max concurrency."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "runCommandsStarted": {
                    v.spec.id: v.run_commands for v in self._vms.values() if v.run_commands
                },
                "conflicts": {v.spec.id: v.conflicts for v in self._vms.values() if v.conflicts},
                "liveConflicts": {
                    v.spec.id: v.live_conflicts for v in self._vms.values() if v.live_conflicts
                },
                "maxConcurrentRunCommands": {
                    v.spec.id: v.max_concurrent for v in self._vms.values() if v.max_concurrent
                },
            }

    def snapshot(self) -> list[VmView]:
        """Every VM that exists now (deleted ones left out), in estate order, Run Commands settled."""
        with self._lock:
            now = self._clock()
            views: list[VmView] = []
            for vm in self._vms.values():
                if vm.deleted:
                    continue
                self._settle(vm, now)
                channel = vm.guest.channel if vm.guest is not None else None
                views.append(VmView(spec=vm.spec, power_state=vm.power_state, channel=channel))
            return views

    def max_concurrent_run_commands(self) -> int:
        """The most Run Commands ever running at once on any one VM (never more than 1 here)."""
        with self._lock:
            return max((v.max_concurrent for v in self._vms.values()), default=0)

    def state_dump(self) -> dict[str, dict[str, Any]]:
        """Per VM id (deleted VMs left out): ARM and licensing state, Run Commands, and ``changed``."""
        with self._lock:
            now = self._clock()
            out: dict[str, dict[str, Any]] = {}
            for vm in self._vms.values():
                if vm.deleted:
                    continue
                self._settle(vm, now)
                entry: dict[str, Any] = {"os": vm.spec.os, "powerState": vm.power_state}
                if vm.guest is not None:
                    g = vm.guest
                    entry.update(
                        editionId=g.edition_id,
                        channel=g.channel,
                        licenseStatus=g.license_status,
                        partialProductKey=g.partial_product_key,
                        kmsHost=g.kms_target,
                    )
                entry["runCommands"] = vm.run_commands
                entry["changed"] = vm.guest is not None and vm.guest.licensing() != vm.initial
                out[vm.spec.id] = entry
            return out

    # ------------------------------------------------------------------ internals

    def _count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def count(self, kind: str) -> None:
        """Count a request the server answered itself (``unauthorized``, ``token``)."""
        self._count(kind)

    def _vm(self, vm_id: str) -> VmState:
        vm = self._vms.get(vm_id.lower())
        if vm is None:
            raise KeyError(f"no VM {vm_id} in the estate")
        return vm

    def _list(
        self,
        keys: list[str],
        path: str,
        query: Mapping[str, str],
        q: Mapping[str, str],
        base_url: str,
        now: float,
    ) -> ArmResponse:
        if q.get("$expand", "").lower() == "instanceview" and not q.get("$filter"):
            return arm_error(
                400,
                "InvalidParameter",
                "The value of parameter '$expand' is invalid: 'instanceView' can only be specified "
                "together with a valid $filter.",
            )
        token = q.get("$skiptoken", "0")
        if not token.isdigit():
            return arm_error(400, "InvalidSkipToken", f"The skip token '{token[:40]}' is invalid.")
        start = int(token)
        live = [self._vms[k] for k in keys if not self._vms[k].deleted]
        page = live[start : start + self.page_size]
        status_only = q.get("statusonly", "").lower() == "true"
        value = [self._lean(vm, now) if status_only else self._model(vm, now) for vm in page]
        body: dict[str, Any] = {"value": value}
        if start + self.page_size < len(live):
            params = [(k, v) for k, v in query.items() if k.lower() != "$skiptoken"]
            params.append(("$skiptoken", str(start + self.page_size)))
            body["nextLink"] = f"{base_url}{path}?{urlencode(params)}"
        return ArmResponse(200, body)

    def _model(self, vm: VmState, now: float, *, instance_view: bool = False) -> dict[str, Any]:
        spec = vm.spec
        vm_uuid = uuid.uuid5(uuid.NAMESPACE_URL, spec.key)
        disk, disk_id = _os_disk(vm)
        rg_id = f"/subscriptions/{spec.subscription_id}/resourceGroups/{spec.resource_group}"
        os_config: dict[str, Any]
        if spec.os == "Windows":
            os_config = {"windowsConfiguration": {"provisionVMAgent": True, "enableAutomaticUpdates": True}}
        else:
            os_config = {
                "linuxConfiguration": {"disablePasswordAuthentication": True, "provisionVMAgent": True}
            }
        props: dict[str, Any] = {
            "vmId": str(vm_uuid),
            "hardwareProfile": {"vmSize": spec.vm_size},
            "storageProfile": {
                "osDisk": {
                    "osType": spec.os,
                    "name": disk,
                    "createOption": spec.create_option,
                    "caching": "ReadWrite",
                    "managedDisk": {
                        "storageAccountType": "Premium_LRS",
                        "id": disk_id,
                    },
                    "deleteOption": "Detach",
                    "diskSizeGB": 127 if spec.os == "Windows" else 30,
                },
                "dataDisks": [],
            },
            "networkProfile": {
                "networkInterfaces": [
                    {"id": f"{rg_id}/providers/Microsoft.Network/networkInterfaces/{spec.name}-nic"}
                ]
            },
            "provisioningState": "Succeeded",
            "timeCreated": _CREATED,
        }
        if spec.create_option == "FromImage":
            # Set at provisioning from the image; a VM created from an attached OS disk has none.
            props["osProfile"] = {
                "computerName": spec.hostname,
                "adminUsername": "azureadmin",
                **os_config,
                "secrets": [],
                "allowExtensionOperations": True,
            }
        if spec.os == "Windows":
            props["licenseType"] = "Windows_Server"
        if instance_view:
            props["instanceView"] = self._instance_view(vm, now)
        return {
            "name": spec.name,
            "id": spec.id,
            "type": "Microsoft.Compute/virtualMachines",
            "location": spec.location,
            "tags": dict(spec.tags),
            "properties": props,
        }

    def _lean(self, vm: VmState, now: float) -> dict[str, Any]:
        """A ``statusOnly=true`` list item: run-time status only, no tags and no storage profile."""
        spec = vm.spec
        return {
            "name": spec.name,
            "id": spec.id,
            "type": "Microsoft.Compute/virtualMachines",
            "location": spec.location,
            "properties": {
                "vmId": str(uuid.uuid5(uuid.NAMESPACE_URL, spec.key)),
                "instanceView": self._instance_view(vm, now),
            },
        }

    def _agent_ready(self, vm: VmState, at: float) -> bool:
        """The agent's status at a moment: the estate's (or a hook's), unless the agent flaps."""
        if not vm.agent_ready or not vm.flapping:
            return vm.agent_ready
        period = self.faults.plan.flap_period_s
        return int((at - self._started) / period + vm.flap_phase) % 2 == 0

    def _instance_view(self, vm: VmState, now: float) -> dict[str, Any]:
        spec = vm.spec
        view: dict[str, Any] = {}
        running = vm.power_state == "running"
        agent_ready = self._agent_ready(vm, now)
        if running and vm.agent_ready and not agent_ready:
            self.faults.note("agentFlap", spec.id, "instance view: Not Ready")
        if running and agent_ready:
            view["computerName"] = spec.hostname
            if vm.guest is not None:
                view["osName"] = vm.guest.caption.removeprefix("Microsoft ")
                view["osVersion"] = f"Microsoft Windows NT {nt_version(vm.guest.build)}.0"
            else:
                view["osName"] = "ubuntu"
                view["osVersion"] = "22.04"
            view["vmAgent"] = {
                "vmAgentVersion": _AGENT_VERSION[spec.os],
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Ready",
                        "message": "GuestAgent is running and accepting new configurations.",
                        "time": _iso(datetime.now(UTC)),
                    }
                ],
                "extensionHandlers": [],
            }
        elif running:
            view["vmAgent"] = {
                "vmAgentVersion": "Unknown",
                "statuses": [
                    {
                        "code": "ProvisioningState/Unavailable",
                        "level": "Warning",
                        "displayStatus": "Not Ready",
                        "message": "VM Agent is unresponsive.",
                        "time": _iso(datetime.now(UTC)),
                    }
                ],
            }
        view["hyperVGeneration"] = "V2"
        view["statuses"] = [
            {
                "code": "ProvisioningState/succeeded",
                "level": "Info",
                "displayStatus": "Provisioning succeeded",
                "time": _CREATED,
            },
            {
                "code": f"PowerState/{vm.power_state}",
                "level": "Info",
                "displayStatus": POWER_DISPLAY[vm.power_state],
            },
        ]
        return view

    def _run_command(
        self, vm: VmState, raw: bytes, api_version: str, base_url: str, now: float, *, ghost: bool = False
    ) -> ArmResponse:
        parsed = _run_command_input(raw)
        if isinstance(parsed, ArmResponse):
            return parsed
        command_id, script, parameters = parsed
        target_os = COMMAND_OS.get(command_id)
        if target_os is None:
            return arm_error(404, "NotFound", "The entity was not found in this Azure location.")
        if target_os != vm.spec.os:
            return arm_error(
                409,
                "Conflict",
                f"Run command OS type '{target_os}' does not match the target OS {vm.spec.os}.",
            )
        if vm.power_state != "running":
            return arm_error(409, "OperationNotAllowed", NOT_RUNNING_MESSAGE)
        self._settle(vm, now)
        if vm.busy_pending:
            # The estate's foreign Run Command is seen from the first attempt on, for busySeconds.
            vm.foreign_until, vm.busy_pending = now + vm.busy_pending, 0.0
        active = (vm.running is not None) + (vm.foreign_until > now)
        if active:
            vm.conflicts += 1
            if vm.running is not None and not vm.running.abandoned:
                vm.live_conflicts += 1
            return arm_error(409, "Conflict", CONFLICT_MESSAGE)
        if self.faults.fire("runCommandBusy", vm.spec.id):
            vm.conflicts += 1
            return arm_error(409, "Conflict", CONFLICT_MESSAGE)
        hung = self.faults.fire("runCommandHang", vm.spec.id)
        fail: str | None = None
        if not hung and self.faults.fire("operationFailed", vm.spec.id):
            fail = "after-script" if self.faults.draw("operationFailed") < 0.5 else "before-script"
        op = Operation(
            id=str(uuid.uuid4()),
            vm_key=vm.spec.key,
            subscription_id=vm.spec.subscription_id,
            location=vm.spec.location,
            started=now,
            ends=now + (self.faults.plan.hang_seconds if hung else self.latency_s),
            started_at=datetime.now(UTC),
            command_id=command_id,
            script=script,
            parameters=parameters,
            agent_ok=self._agent_ready(vm, now),
            hung=hung,
            ghost=ghost,
            fail=fail,
        )
        self._operations[op.id] = op
        vm.running = op
        vm.run_commands += 1
        vm.max_concurrent = max(vm.max_concurrent, active + 1)
        vm.log.append(
            {
                "operationId": op.id,
                "commandId": command_id,
                "script": _script_kind(script),
                "parameters": {p["name"]: p["value"] for p in parameters},
                "status": "InProgress",
                "started": now,
                "ended": None,
                "ran": False,  # the guest ran the script (its effects applied)
                "before": None,  # the guest's licensing when the script ran, and after it
                "after": None,
                "faults": [name for name, on in (("runCommandHang", hung), ("serverError", ghost)) if on],
            }
        )
        base = (
            f"{base_url}/subscriptions/{op.subscription_id}/providers/Microsoft.Compute"
            f"/locations/{op.location}/operations/{op.id}"
        )
        p = uuid.uuid5(uuid.NAMESPACE_OID, op.id)
        return ArmResponse(
            202,
            None,
            {
                "Azure-AsyncOperation": f"{base}?p={p}&api-version={api_version}",
                "Location": f"{base}?p={p}&monitor=true&api-version={api_version}",
                # Whole seconds only: azure-mgmt-compute parses this header of the 202 as an int.
                "Retry-After": str(int(self.latency_s)),
            },
        )

    def _operation(self, op_id: str, *, monitor: bool, now: float) -> ArmResponse:
        op = self._operations.get(op_id)
        if op is None:
            return arm_error(404, "NotFound", f"The operation '{op_id[:60]}' was not found.")
        vm = self._vms.get(op.vm_key)
        if vm is not None:
            self._settle(vm, now)
        remaining = max(0.0, op.ends - now)
        retry = {"Retry-After": f"{remaining + 0.0005:.3f}"} if op.status == "InProgress" else {}
        status_body: dict[str, Any] = {"startTime": _iso(op.started_at), "status": op.status, "name": op.id}
        if op.status != "InProgress":
            status_body["endTime"] = _iso(op.ended_at)
        if op.status == "Failed":
            status_body["error"] = op.error
        if monitor:
            if op.status == "InProgress":
                return ArmResponse(202, None, retry)
            if op.status == "Succeeded":
                return ArmResponse(200, {"value": _result_value(op.output)})
            return ArmResponse(200, status_body)
        if op.status == "Succeeded":
            status_body["properties"] = {"output": {"value": _result_value(op.output)}}
        return ArmResponse(200, status_body, retry)

    def _settle(self, vm: VmState, now: float) -> None:
        """Complete the VM's Run Command if its time is up: apply guest effects, record the result."""
        op = vm.running
        if op is None or now < op.ends:
            return
        vm.running = None
        entry = next(e for e in reversed(vm.log) if e["operationId"] == op.id)
        entry["ended"] = op.ends
        agent_at_end = self._agent_ready(vm, op.ends)
        if vm.deleted or vm.power_state != "running" or not op.agent_ok or not agent_at_end:
            if not vm.deleted and vm.power_state == "running" and vm.agent_ready:
                self.faults.note("agentFlap", vm.spec.id, "Run Command failed: agent Not Ready")
            op.status = "Failed"
            op.error = {
                "code": AGENT_ERROR,
                "message": f"VM '{vm.spec.name}' has not reported status for VM agent or extensions. "
                "Please verify the VM has a running VM agent, and can establish outbound connections "
                "to Azure storage.",
            }
        elif op.fail == "before-script":
            op.status, op.error = "Failed", dict(EXECUTION_ERROR)
            entry["faults"].append("operationFailed")
        else:
            output = ""
            if vm.guest is not None:
                entry["before"] = _licensing(vm.guest)
                output = vm.guest.run_script(op.script, op.parameters)
                entry["after"] = _licensing(vm.guest)
            entry["ran"] = True
            if op.fail == "after-script":
                op.status, op.error = "Failed", dict(EXECUTION_ERROR)
                entry["faults"].append("operationFailed")
            else:
                op.output = self._delivered(vm, entry, output)
                op.status = "Succeeded"
                if _detected(entry) and self.faults.fire("vmVanish", vm.spec.id):
                    deleted = self.faults.draw("vmVanish") < 0.5
                    vm.deleted = vm.deleted or deleted
                    if not deleted:
                        vm.power_state = "deallocated"
                    entry["faults"].append("vmVanish")
        entry["status"] = op.status

    def _delivered(self, vm: VmState, entry: dict[str, Any], output: str) -> str:
        """What Run Command hands back: the last 4,096 bytes, after any output fault."""
        if self.faults.fire("outputTruncated", vm.spec.id):
            # The guest printed more after the result line (and maybe before it), so the 4,096-byte
            # window ends after the marker line: kept whole, cut through, or lost altogether.
            before = _noise(int(self.faults.draw("outputTruncated") * 2 * OUTPUT_LIMIT_BYTES))
            after = _noise(int(self.faults.draw("outputTruncated") * (OUTPUT_LIMIT_BYTES + 1024)))
            output = "\n".join(part for part in (before, output, after) if part)
            entry["faults"].append("outputTruncated")
        delivered = _last_bytes(output, OUTPUT_LIMIT_BYTES)
        if delivered and self.faults.fire("outputGarbled", vm.spec.id):
            # Bytes that are not UTF-8 any more (a code page mix-up), decoded with replacement.
            data = bytearray(delivered.encode("utf-8"))
            for _ in range(1 + int(self.faults.draw("outputGarbled") * 8)):
                data[int(self.faults.draw("outputGarbled") * len(data))] = 0xFF
            delivered = data.decode("utf-8", errors="replace")
            entry["faults"].append("outputGarbled")
        return delivered


def _route(low: list[str]) -> tuple[str, str] | None:
    """(route kind, method) for a lower-cased path, or None."""
    if len(low) < 5 or low[0] != "subscriptions":
        return None
    if low[2:4] == ["providers", "microsoft.compute"]:
        if len(low) == 5 and low[4] == "virtualmachines":
            return ("list_all", "GET")
        if len(low) == 8 and low[4] == "locations" and low[6] == "operations":
            return ("operation", "GET")
        return None
    if (
        low[2] != "resourcegroups"
        or len(low) < 7
        or low[4:7] != ["providers", "microsoft.compute", "virtualmachines"]
    ):
        return None
    if len(low) == 7:
        return ("list_by_resource_group", "GET")
    if len(low) == 8:
        return ("get", "GET")
    if len(low) == 9 and low[8] == "instanceview":
        return ("instance_view", "GET")
    if len(low) == 9 and low[8] == "runcommand":
        return ("run_command", "POST")
    return None


def _run_command_input(
    raw: bytes,
) -> tuple[str, tuple[str, ...], tuple[dict[str, str], ...]] | ArmResponse:
    """Validate a RunCommandInput body as ARM does."""
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return arm_error(
            400, "InvalidRequestContent", "The request content was invalid and could not be deserialized."
        )
    if not isinstance(data, dict):
        return arm_error(
            400, "InvalidRequestContent", "The request content was invalid and could not be deserialized."
        )
    command_id = data.get("commandId")
    if not isinstance(command_id, str) or not command_id:
        return arm_error(400, "InvalidParameter", "Required parameter 'commandId' is missing (null).")
    script = data.get("script") or []
    # Every line a string, checked in C (a script is 500 lines, a generator was most of this check).
    if not isinstance(script, list) or not set(map(type, script)) <= {str}:
        return arm_error(400, "InvalidParameter", "The value of parameter 'script' is invalid.")
    params_raw = data.get("parameters") or []
    params: list[dict[str, str]] = []
    if not isinstance(params_raw, list):
        return arm_error(400, "InvalidParameter", "The value of parameter 'parameters' is invalid.")
    for item in params_raw:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("value"), str)
        ):
            return arm_error(
                400,
                "InvalidParameter",
                "Each item of 'parameters' needs a string 'name' and a string 'value'.",
            )
        params.append({"name": item["name"], "value": item["value"]})
    return command_id, tuple(script), tuple(params)


def _result_value(stdout: str) -> list[dict[str, str]]:
    """RunCommandResult.value as in the spec example: the StdOut entry, then the StdErr entry."""
    return [
        {
            "code": "ComponentStatus/StdOut/succeeded",
            "level": "Info",
            "displayStatus": "Provisioning succeeded",
            "message": stdout,
        },
        {
            "code": "ComponentStatus/StdErr/succeeded",
            "level": "Info",
            "displayStatus": "Provisioning succeeded",
            "message": "",
        },
    ]


def _script_kind(script: tuple[str, ...]) -> str:
    """The script's first non-blank line (after a leading BOM) names it: the lines are read up to
    that one only, as lines of the script's text (items joined with line breaks)."""
    first = ""
    for i, item in enumerate(script):
        text = item.lstrip("\ufeff") if i == 0 else item
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if first:
            break
    return {DETECT_FIRST_LINE: "detect", REMEDIATE_FIRST_LINE: "remediate"}.get(first, "other")


def _last_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[-limit:].decode("utf-8", errors="ignore")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _detected(entry: Mapping[str, Any]) -> bool:
    """A detection that completed: the detection script, or a conditional re-key (the remediation
    script with ``ExpectBuild``, docs/guest-contract.md) that only read the facts."""
    if entry["script"] == "detect":
        return True
    conditional = entry["script"] == "remediate" and "ExpectBuild" in entry["parameters"]
    return conditional and entry["before"] == entry["after"]


def _licensing(guest: WindowsGuest) -> dict[str, Any]:
    return {
        "channel": guest.channel,
        "licenseStatus": guest.license_status,
        "editionId": guest.edition_id,
        "sku": guest.sku,
        "kmsHost": guest.kms_target,
    }


def _noise(size: int) -> str:
    """About ``size`` bytes of ASCII lines that are not the result line."""
    lines: list[str] = []
    total = 0
    while total < size:
        line = _NOISE_LINE.format(len(lines))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)


def server_error(draw: float, subscription: str, latency_s: float) -> ArmResponse:
    """A 500 or a 503 from ARM (fault ``serverError``); the 503 carries a Retry-After (a guess:
    docs/simulator.md, Faults)."""
    if draw < 0.5:
        return arm_error(
            500,
            "InternalServerError",
            "Encountered internal server error. Diagnostic information: timestamp "
            f"'{datetime.now(UTC):%Y%m%dT%H%M%SZ}', subscription id '{subscription}', "
            f"tracking id '{uuid.uuid4()}', request correlation id '{uuid.uuid4()}'.",
        )
    error = arm_error(
        503,
        "ServiceUnavailable",
        "The service is temporarily unavailable. Please retry the request after some time.",
    )
    return ArmResponse(error.status, error.body, {"Retry-After": f"{max(latency_s, 0.001):.3f}"})


def _policy_throttled(answer: ThrottleAnswer) -> ArmResponse:
    """Compute's refusal under one of its own policies (troubleshooting-throttling-errors.md): 429
    ``OperationNotAllowed`` with an inner ``TooManyRequests`` naming the policy, whose message is the
    violation's JSON, and ``Retry-After`` (here the time until the policy's bucket has a token)."""
    wait = answer.retry_after_s + 0.0005
    violation = {
        "operationGroup": answer.policy,
        "startTime": _iso(datetime.fromtimestamp(answer.window_start, UTC)),
        "endTime": _iso(datetime.fromtimestamp(answer.window_end, UTC)),
        "allowedRequestCount": answer.allowed_count,
        "measuredRequestCount": answer.measured,
    }
    body = {
        "error": {
            "code": "OperationNotAllowed",
            "message": "The server rejected the request because too many requests have been received "
            "for this subscription.",
            "details": [
                {
                    "code": "TooManyRequests",
                    "target": answer.policy,
                    "message": json.dumps(violation, separators=(",", ":")),
                }
            ],
        }
    }
    return ArmResponse(429, body, {"Retry-After": f"{wait:.3f}"})


def _throttled(answer: ArmVerdict, subscription: str) -> ArmResponse:
    """ARM's token-bucket refusal: 429 ``SubscriptionRequestsThrottled`` with Retry-After."""
    kind = answer.header.rsplit("-", 1)[-1].removesuffix("s")  # read, write, delete
    wait = answer.retry_after_s + 0.0005
    error = arm_error(
        429,
        "SubscriptionRequestsThrottled",
        f"Number of '{kind}' requests for subscription '{subscription}' actor '{THROTTLED_ACTOR}' "
        f"exceeded. Please try again after '{wait:.3f}' seconds after additional tokens are available. "
        "Refer to https://aka.ms/arm-throttling for additional information.",
    )
    return ArmResponse(error.status, error.body, {"Retry-After": f"{wait:.3f}"})


def _with_remaining(
    answer: ArmResponse, throttle: ThrottleAnswer | None, budget: ArmVerdict | None
) -> ArmResponse:
    """Every answer carries the subscription's remaining budget of its kind (reads, writes or
    deletes: ARM's, and only ARM's); with the armThrottling fault on, Compute's policy's remainder
    too, in ``x-ms-ratelimit-remaining-resource`` (``Microsoft.Compute/<policy>;<count>``)."""
    headers: dict[str, str] = {}
    if budget is not None:
        headers[budget.header] = str(budget.remaining)
    if throttle is not None:
        headers[REMAINING_RESOURCE] = throttle.header
    if not headers:
        return answer
    return ArmResponse(answer.status, answer.body, {**answer.headers, **headers})
