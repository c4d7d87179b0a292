"""What ARM tells about a VM before anything runs inside it: OS, power, agent, tags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.model import VmId


@dataclass(frozen=True, slots=True)
class VmFacts:
    """The gate inputs, read from the VM model and its instance view."""

    vm_id: VmId
    os_type: str | None  # "Windows" | "Linux" | None when ARM does not say
    power_state: str | None  # "running", "deallocated", "stopped", ... (PowerState/<x>); None if unknown
    agent_ready: bool | None  # None when the instance view was not read
    tags: Mapping[str, str] = field(default_factory=dict)
    location: str = ""
    os_disk_id: str = ""  # the managed OS disk's id (or its name): a re-image or disk swap changes it
    # What the VM agent reports of the running guest (instance view osName / osVersion, e.g.
    # "Windows Server 2016 Datacenter", "Microsoft Windows NT 10.0.14393.0"); "" when not reported.
    os_name: str = ""
    os_version: str = ""
    # networkProfile.networkInterfaces[].id, the primary one first (the network check reads it)
    nic_ids: tuple[str, ...] = ()

    @classmethod
    def from_arm(cls, vm: Mapping[str, Any]) -> VmFacts:
        """Build from the wire JSON of a VM (``GET …?$expand=instanceView`` or a ``statusOnly`` list item)."""
        vm_id = VmId.parse(str(vm.get("id", "")))
        props = _obj(vm.get("properties"))
        os_disk = _obj(_obj(props.get("storageProfile")).get("osDisk"))
        os_type = os_disk.get("osType")
        disk_id = _obj(os_disk.get("managedDisk")).get("id") or os_disk.get("name") or ""
        view = props.get("instanceView")
        power: str | None = None
        agent: bool | None = None
        os_name = os_version = ""
        if isinstance(view, Mapping):
            name, version = view.get("osName"), view.get("osVersion")
            os_name = name if isinstance(name, str) else ""
            os_version = version if isinstance(version, str) else ""
            for status in _list(view.get("statuses")):
                code = str(_obj(status).get("code", ""))
                if code.startswith("PowerState/"):
                    power = code.split("/", 1)[1]
            agent_view = view.get("vmAgent")
            agent = False
            if isinstance(agent_view, Mapping):
                agent = any(
                    str(_obj(s).get("displayStatus", "")).lower() == "ready"
                    for s in _list(agent_view.get("statuses"))
                )
        tags = {str(k): str(v) for k, v in _obj(vm.get("tags")).items()}
        nics = [_obj(n) for n in _list(_obj(props.get("networkProfile")).get("networkInterfaces"))]
        nics.sort(key=lambda n: not _obj(n.get("properties")).get("primary", len(nics) == 1))
        nic_ids = tuple(str(n["id"]) for n in nics if isinstance(n.get("id"), str))
        return cls(
            vm_id=vm_id,
            os_type=str(os_type) if isinstance(os_type, str) else None,
            power_state=power,
            agent_ready=agent,
            tags=tags,
            location=str(vm.get("location", "")),
            os_disk_id=str(disk_id) if isinstance(disk_id, str) else "",
            os_name=os_name,
            os_version=os_version,
            nic_ids=nic_ids,
        )


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
