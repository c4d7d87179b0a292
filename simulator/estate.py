"""The simulated estate: which VMs exist, their ARM state and their Windows licensing state.

An estate is plain data (a JSON file, or a generator recipe) validated strictly up front, so that a
typo in a rehearsal file fails loudly with the JSON path of the problem instead of silently
producing a VM the engine then mis-handles. The file format is documented in docs/simulator.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from simulator.faults import FaultPlan
    from simulator.network import NetworkSpec, NicSpec

CHANNELS: Final = ("AVMA", "KMS_CLIENT", "RETAIL", "MAK", "OEM")
# Every PowerState/<code> ARM reports (states-billing.md; the SDKs' PowerState enums).
POWER_STATES: Final = (
    "starting",
    "running",
    "stopping",
    "stopped",
    "deallocating",
    "deallocated",
    "unknown",
)
# storageProfile.osDisk.createOption of a VM: from an image (osProfile set at provisioning) or an
# attached, specialized OS disk (no osProfile at all: the usual migrated AVMA VM).
CREATE_OPTIONS: Final = ("FromImage", "Attach")
CLOUDS: Final = ("AzureCloud", "AzureUSGovernment", "AzureChinaCloud")
DEFAULT_LOCATION: Final = "westeurope"
OPT_OUT_TAG: Final = "avma-remediator-opt-out"

_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Compute/virtualMachines/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_RG = re.compile(r"^[-\w._()]{1,90}$")
_VM_NAME = re.compile(r"^[A-Za-z0-9][-\w.]{0,63}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# The last five characters of a product key: Windows's key alphabet (BCDFGHJKMPQRTVWXY2346789) and
# the N that keys since Windows 8 carry once (so N may be among the last five).
_PARTIAL_KEY = re.compile(r"^[BCDFGHJKMNPQRTVWXY2346789]{5}$")
UINT32_MAX: Final = 0xFFFF_FFFF
# BuildNumber: NT 6.0 (Server 2008, build 6000-6003) is the oldest Windows the guest model knows;
# OSVERSIONINFOEX.dwBuildNumber is a DWORD, but Windows builds have stayed below 65536.
MIN_BUILD: Final = 6000
MAX_BUILD: Final = 65_535
PS_VERSIONS: Final = ("1.0", "2.0", "3.0", "4.0", "5.0", "5.1")
# A Windows computer (NetBIOS) name: 1-15 letters, digits and hyphens, not all digits.
_COMPUTER_NAME = re.compile(r"^(?![0-9]+$)[A-Za-z0-9-]{1,15}$")
_LOCATION = re.compile(r"^[a-z0-9]{2,40}$")


class EstateError(ValueError):
    """The estate is invalid; ``path`` is the JSON path of the offending value (``$.vms[3].guest``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """The initial Windows state of one VM (what WMI and the registry would report)."""

    caption: str
    build: int
    product_type: int
    edition_id: str
    sku: int
    channel: str
    license_status: int
    kms_host: str | None
    kms_port: int
    kms_reachable: bool
    partial_product_key: str | None = None
    grace_minutes: int | None = None
    ps_version: str | None = None  # None: the version the OS ships with (simulator.guest.default_ps_version)
    imds_reachable: bool = True  # Azure Edition only
    imds_chain_valid: bool = True  # Azure Edition only
    null_name: bool = False  # SoftwareLicensingProduct.Name is null
    null_description: bool = False  # SoftwareLicensingProduct.Description is null
    # Derived from the estate's network (simulator/network.py), never written to a file: whether
    # the VM's NIC reaches the cloud's KMS. ``kms_reachable`` is what the guest itself allows.
    network_reachable: bool = True
    network_why: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "caption": self.caption,
            "build": self.build,
            "productType": self.product_type,
            "editionId": self.edition_id,
            "sku": self.sku,
            "channel": self.channel,
            "licenseStatus": self.license_status,
            "kmsHost": f"{self.kms_host}:{self.kms_port}" if self.kms_host else None,
            "kmsReachable": self.kms_reachable,
        }
        if self.partial_product_key is not None:
            out["partialProductKey"] = self.partial_product_key
        if self.grace_minutes is not None:
            out["graceMinutes"] = self.grace_minutes
        if self.ps_version is not None:
            out["psVersion"] = self.ps_version
        if not self.imds_reachable:
            out["imdsReachable"] = False
        if not self.imds_chain_valid:
            out["imdsChainValid"] = False
        if self.null_name:
            out["productName"] = None
        if self.null_description:
            out["productDescription"] = None
        return out


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One VM as ARM sees it, plus its guest for Windows."""

    id: str
    subscription_id: str
    resource_group: str
    name: str
    os: str
    power_state: str
    agent_ready: bool
    tags: Mapping[str, str]
    location: str = DEFAULT_LOCATION
    guest: GuestSpec | None = None
    busy_seconds: float = 0.0
    vm_size: str = "Standard_D2s_v5"
    computer_name: str | None = None
    log_resource_id: bool = True
    create_option: str = "FromImage"
    nic: NicSpec | None = None  # the VM's NIC in the estate's network; None: no NIC is served

    @property
    def key(self) -> str:
        """ARM ids compare case-insensitively."""
        return self.id.lower()

    @property
    def hostname(self) -> str:
        """The guest's computer name: ``computerName``, else the VM name cut to 15 characters.

        The portal does the same cut for Windows, whose computer names are NetBIOS names.
        """
        return self.computer_name or self.name[:15]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "os": self.os,
            "powerState": self.power_state,
            "agentReady": self.agent_ready,
            "tags": dict(self.tags),
            "location": self.location,
        }
        if self.vm_size != "Standard_D2s_v5":
            out["vmSize"] = self.vm_size
        if self.busy_seconds:
            out["busySeconds"] = self.busy_seconds
        if self.computer_name is not None:
            out["computerName"] = self.computer_name
        if not self.log_resource_id:
            out["logResourceId"] = False
        if self.create_option != "FromImage":
            out["createOption"] = self.create_option
        if self.nic is not None:
            out["nic"] = self.nic.to_dict()
        if self.guest is not None:
            out["guest"] = self.guest.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class Estate:
    """A validated estate: :meth:`load`, :meth:`from_dict`, :meth:`default` or :meth:`generate`."""

    vms: tuple[VmSpec, ...]
    subscriptions: tuple[str, ...]
    cloud: str = "AzureCloud"
    faults: FaultPlan = field(default_factory=lambda: _no_faults())
    network: NetworkSpec | None = None
    _by_key: Mapping[str, VmSpec] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {vm.key: vm for vm in self.vms})

    def get(self, vm_id: str) -> VmSpec | None:
        return self._by_key.get(vm_id.lower())

    def to_dict(self) -> dict[str, Any]:
        """The estate as an explicit estate file (a generated estate can be saved and edited)."""
        out: dict[str, Any] = {
            "cloud": self.cloud,
            "subscriptions": list(self.subscriptions),
            "vms": [vm.to_dict() for vm in self.vms],
        }
        if self.network is not None:
            out["network"] = dict(self.network.raw)
        if self.faults.enabled:
            out["faults"] = self.faults.to_dict()
        return out

    def with_faults(self, faults: FaultPlan) -> Estate:
        """The same VMs with another fault plan (docs/simulator.md, "Faults")."""
        return Estate(
            vms=self.vms,
            subscriptions=self.subscriptions,
            cloud=self.cloud,
            faults=faults,
            network=self.network,
        )

    @classmethod
    def load(cls, path: str | Path) -> Estate:
        """Read and validate an estate file (explicit or generator form)."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise EstateError("$", f"not valid JSON ({error.msg} at line {error.lineno})") from error
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> Estate:
        """The built-in rehearsal estate (simulator/default_estate.json, intent in docs/simulator.md)."""
        text = resources.files("simulator").joinpath("default_estate.json").read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: object) -> Estate:
        """Validate ``data`` (the parsed JSON) and build the estate; raise :class:`EstateError`."""
        obj = _object(data, "$")
        faults = _faults(obj.get("faults", {}))
        if "generate" in obj:
            _keys(obj, "$", required=("generate",), optional=("faults",))
            gen = _object(obj["generate"], "$.generate")
            _keys(gen, "$.generate", required=("count", "seed"), optional=("mix", "subscriptions", "cloud"))
            count = _int(gen["count"], "$.generate.count", low=0, high=1_000_000)
            seed = _int(gen["seed"], "$.generate.seed")
            mix_obj = _object(gen.get("mix", {}), "$.generate.mix")
            mix = {k: _number(v, f"$.generate.mix.{k}", low=0.0, high=1.0) for k, v in mix_obj.items()}
            subs = _int(gen.get("subscriptions", 2), "$.generate.subscriptions", low=1, high=100)
            cloud = _choice(gen.get("cloud", "AzureCloud"), "$.generate.cloud", CLOUDS)
            estate = cls.generate(count=count, seed=seed, mix=mix, subscriptions=subs, cloud=cloud)
            return estate.with_faults(faults)
        _keys(obj, "$", required=("vms",), optional=("subscriptions", "cloud", "faults", "network"))
        cloud = _choice(obj.get("cloud", "AzureCloud"), "$.cloud", CLOUDS)
        network = _network(obj["network"]) if "network" in obj else None
        declared: list[str] | None = None
        if "subscriptions" in obj:
            declared = []
            seen_subs: set[str] = set()
            for i, sub in enumerate(_array(obj["subscriptions"], "$.subscriptions")):
                text = _string(sub, f"$.subscriptions[{i}]")
                if not _GUID.match(text):
                    raise EstateError(f"$.subscriptions[{i}]", f"not a subscription id (GUID): {text[:60]!r}")
                if text.lower() in seen_subs:
                    raise EstateError(f"$.subscriptions[{i}]", f"duplicate subscription {text}")
                seen_subs.add(text.lower())
                declared.append(text)
        vms: list[VmSpec] = []
        first_seen: dict[str, int] = {}
        for i, raw in enumerate(_array(obj["vms"], "$.vms")):
            vm = _vm(raw, f"$.vms[{i}]", network, cloud)
            if vm.key in first_seen:
                raise EstateError(
                    f"$.vms[{i}].id", f"duplicate of $.vms[{first_seen[vm.key]}].id (ids ignore case)"
                )
            first_seen[vm.key] = i
            if declared is not None and vm.subscription_id.lower() not in {s.lower() for s in declared}:
                raise EstateError(
                    f"$.vms[{i}].id", f"subscription {vm.subscription_id} is not in $.subscriptions"
                )
            vms.append(vm)
        if declared is None:
            declared = []
            for vm in vms:
                if vm.subscription_id.lower() not in {s.lower() for s in declared}:
                    declared.append(vm.subscription_id)
        return cls(vms=tuple(vms), subscriptions=tuple(declared), cloud=cloud, faults=faults, network=network)

    @classmethod
    def generate(
        cls,
        *,
        count: int,
        seed: int,
        mix: Mapping[str, float] | None = None,
        subscriptions: int = 2,
        cloud: str = "AzureCloud",
    ) -> Estate:
        """A deterministic estate of ``count`` VMs: same arguments, same estate (see docs/simulator.md)."""
        from simulator.generator import generate_vms  # one module per concept: the recipe lives there

        if count < 0:
            raise EstateError("$.generate.count", "must be 0 or more")
        if subscriptions < 1:
            raise EstateError("$.generate.subscriptions", "must be 1 or more")
        if cloud not in CLOUDS:
            raise EstateError("$.generate.cloud", f"expected one of {', '.join(CLOUDS)}")
        subs, vms = generate_vms(count=count, seed=seed, mix=dict(mix or {}), subscriptions=subscriptions)
        return cls.from_dict({"cloud": cloud, "subscriptions": subs, "vms": vms})


# ------------------------------------------------------------------ validation helpers


def _no_faults() -> FaultPlan:
    from simulator.faults import FaultPlan  # faults.py raises EstateError, so it imports this module

    return FaultPlan()


def _faults(raw: object) -> FaultPlan:
    from simulator.faults import FaultPlan

    return FaultPlan.from_dict(raw, "$.faults")


def _network(raw: object) -> NetworkSpec:
    from simulator.network import parse_network  # network.py raises EstateError, so it imports this module

    return parse_network(raw, "$.network")


def _vm(raw: object, path: str, network: NetworkSpec | None = None, cloud: str = "AzureCloud") -> VmSpec:
    obj = _object(raw, path)
    _keys(
        obj,
        path,
        required=("id", "os", "powerState", "agentReady", "tags"),
        optional=(
            "location",
            "guest",
            "busySeconds",
            "vmSize",
            "computerName",
            "logResourceId",
            "createOption",
            "nic",
        ),
    )
    vm_id = _string(obj["id"], f"{path}.id")
    match = _VM_ID.match(vm_id)
    if match is None:
        raise EstateError(f"{path}.id", f"not a virtual machine resource id: {vm_id[:200]!r}")
    sub, rg, name = match["sub"], match["rg"], match["name"]
    if not _GUID.match(sub):
        raise EstateError(f"{path}.id", f"subscription id is not a GUID: {sub[:60]!r}")
    if not _RG.match(rg) or rg.endswith("."):
        raise EstateError(f"{path}.id", f"invalid resource group name: {rg[:100]!r}")
    if not _VM_NAME.match(name):
        raise EstateError(f"{path}.id", f"invalid virtual machine name: {name[:100]!r}")
    os_type = _choice(obj["os"], f"{path}.os", ("Windows", "Linux"))
    power = _choice(obj["powerState"], f"{path}.powerState", POWER_STATES)
    agent = _bool(obj["agentReady"], f"{path}.agentReady")
    tags_obj = _object(obj["tags"], f"{path}.tags")
    tags: dict[str, str] = {}
    for tag, value in tags_obj.items():
        if not tag or len(tag) > 512 or any(c in tag for c in "<>%&\\?/"):
            raise EstateError(f"{path}.tags", f"invalid tag name {tag[:80]!r}")
        tags[tag] = _string(value, f"{path}.tags.{tag}", allow_empty=True)
    location = _string(obj.get("location", DEFAULT_LOCATION), f"{path}.location")
    if not _LOCATION.match(location):
        raise EstateError(f"{path}.location", f"not an Azure region name: {location[:60]!r}")
    busy = _number(obj.get("busySeconds", 0), f"{path}.busySeconds", low=0.0, high=86_400.0)
    vm_size = _string(obj.get("vmSize", "Standard_D2s_v5"), f"{path}.vmSize")
    computer_name: str | None = None
    if "computerName" in obj:
        computer_name = _string(obj["computerName"], f"{path}.computerName")
        if not _COMPUTER_NAME.match(computer_name):
            raise EstateError(
                f"{path}.computerName",
                "not a Windows computer name (1-15 letters, digits, hyphens, not all digits): "
                f"{computer_name[:60]!r}",
            )
    log_resource_id = _bool(obj.get("logResourceId", True), f"{path}.logResourceId")
    create_option = _choice(obj.get("createOption", "FromImage"), f"{path}.createOption", CREATE_OPTIONS)
    guest: GuestSpec | None = None
    if os_type == "Windows":
        if "guest" not in obj:
            raise EstateError(f"{path}.guest", "required for a Windows VM")
        guest = _guest(obj["guest"], f"{path}.guest")
    elif "guest" in obj:
        raise EstateError(f"{path}.guest", "only Windows VMs have a guest model")
    nic: NicSpec | None = None
    if "nic" in obj:
        from simulator.network import kms_path, parse_nic

        nic = parse_nic(obj["nic"], f"{path}.nic", network)
        assert network is not None  # parse_nic refuses a nic without a network
        if guest is not None:
            verdict = kms_path(nic, network, cloud)
            guest = replace(guest, network_reachable=verdict.reachable, network_why=verdict.why)
    return VmSpec(
        id=vm_id,
        subscription_id=sub,
        resource_group=rg,
        name=name,
        os=os_type,
        power_state=power,
        agent_ready=agent,
        tags=tags,
        location=location,
        guest=guest,
        busy_seconds=busy,
        vm_size=vm_size,
        computer_name=computer_name,
        log_resource_id=log_resource_id,
        create_option=create_option,
        nic=nic,
    )


def _guest(raw: object, path: str) -> GuestSpec:
    obj = _object(raw, path)
    _keys(
        obj,
        path,
        required=(
            "caption",
            "build",
            "productType",
            "editionId",
            "sku",
            "channel",
            "licenseStatus",
            "kmsHost",
            "kmsReachable",
        ),
        optional=(
            "partialProductKey",
            "graceMinutes",
            "psVersion",
            "imdsReachable",
            "imdsChainValid",
            "productName",
            "productDescription",
        ),
    )
    kms_host: str | None = None
    kms_port = 0
    if obj["kmsHost"] is not None:
        text = _string(obj["kmsHost"], f"{path}.kmsHost")
        host, sep, port_text = text.rpartition(":")
        if (
            not sep
            or not _HOSTNAME.match(host)
            or not port_text.isdigit()
            or not 1 <= int(port_text) <= 65535
        ):
            raise EstateError(f"{path}.kmsHost", f"expected null or 'host:port', got {text[:80]!r}")
        kms_host, kms_port = host.lower(), int(port_text)
    partial: str | None = None
    if "partialProductKey" in obj:
        partial = _string(obj["partialProductKey"], f"{path}.partialProductKey")
        if not _PARTIAL_KEY.match(partial):
            raise EstateError(
                f"{path}.partialProductKey",
                "expected 5 characters of Windows's product-key alphabet (BCDFGHJKMNPQRTVWXY2346789)",
            )
    grace: int | None = None
    if "graceMinutes" in obj:
        grace = _int(obj["graceMinutes"], f"{path}.graceMinutes", low=0, high=UINT32_MAX)
    ps_version: str | None = None
    if "psVersion" in obj:
        ps_version = _choice(obj["psVersion"], f"{path}.psVersion", PS_VERSIONS)
    for name in ("productName", "productDescription"):
        if name in obj and obj[name] is not None:
            raise EstateError(
                f"{path}.{name}",
                "only null is accepted (a product whose WMI property is null); "
                "Windows's own text is derived from the edition and channel",
            )
    spec = GuestSpec(
        caption=_string(obj["caption"], f"{path}.caption"),
        build=_int(obj["build"], f"{path}.build", low=MIN_BUILD, high=MAX_BUILD),
        product_type=_int(obj["productType"], f"{path}.productType", low=1, high=3),
        edition_id=_string(obj["editionId"], f"{path}.editionId"),
        sku=_int(obj["sku"], f"{path}.sku", low=0, high=UINT32_MAX),
        channel=_choice(obj["channel"], f"{path}.channel", CHANNELS),
        license_status=_int(obj["licenseStatus"], f"{path}.licenseStatus", low=0, high=6),
        kms_host=kms_host,
        kms_port=kms_port,
        kms_reachable=_bool(obj["kmsReachable"], f"{path}.kmsReachable"),
        partial_product_key=partial,
        grace_minutes=grace,
        ps_version=ps_version,
        imds_reachable=_bool(obj.get("imdsReachable", True), f"{path}.imdsReachable"),
        imds_chain_valid=_bool(obj.get("imdsChainValid", True), f"{path}.imdsChainValid"),
        null_name="productName" in obj,
        null_description="productDescription" in obj,
    )
    from simulator.guest import spec_problem  # guest.py imports GuestSpec from this module

    problem = spec_problem(spec, present=frozenset(obj))
    if problem is not None:
        key, message = problem
        raise EstateError(f"{path}.{key}", message)
    return spec


def _keys(obj: Mapping[str, Any], path: str, *, required: Sequence[str], optional: Sequence[str]) -> None:
    for name in required:
        if name not in obj:
            raise EstateError(f"{path}.{name}", "required key is missing")
    allowed = set(required) | set(optional)
    for name in obj:
        if name not in allowed:
            raise EstateError(f"{path}.{name}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise EstateError(path, f"expected an object, got {_kind(value)}")
    return value


def _array(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise EstateError(path, f"expected an array, got {_kind(value)}")
    return value


def _string(value: object, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise EstateError(path, f"expected a string, got {_kind(value)}")
    if not value and not allow_empty:
        raise EstateError(path, "must not be empty")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise EstateError(path, f"expected true or false, got {_kind(value)}")
    return value


def _int(value: object, path: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EstateError(path, f"expected a whole number, got {_kind(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise EstateError(path, f"{value} is out of range [{low}, {high}]")
    return value


def _number(value: object, path: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EstateError(path, f"expected a number, got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise EstateError(path, f"{value} is out of range [{low:g}, {high:g}]")
    return number


def _choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise EstateError(path, f"expected one of {', '.join(choices)}, got {json.dumps(value)[:60]}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )
