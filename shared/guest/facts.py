"""Typed facts read from a guest, and the parser of the scripts' marked JSON line.

The contract is docs/guest-contract.md. All judgement is made in Python on these facts; the
scripts only read and report.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

RESULT_MARKER = "AVMA-REMEDIATOR-RESULT "
SCHEMA_VERSION = 2
WINDOWS_APPLICATION_ID = "55c92734-d682-4d71-983e-d6ec3f16059f"


class GuestOutputError(ValueError):
    """The Run Command output holds no valid result line (missing, truncated, garbled, wrong schema)."""


class Channel(enum.StrEnum):
    """Licensing channel, from the SPP Description token (locale-independent)."""

    AVMA = "AVMA"
    KMS_CLIENT = "KMS_CLIENT"
    MAK = "MAK"
    RETAIL = "RETAIL"
    OEM = "OEM"
    UNKNOWN = "UNKNOWN"


class LicenseStatus(enum.IntEnum):
    """SoftwareLicensingProduct.LicenseStatus."""

    UNLICENSED = 0
    LICENSED = 1
    OOB_GRACE = 2
    OOT_GRACE = 3
    NON_GENUINE_GRACE = 4
    NOTIFICATION = 5
    EXTENDED_GRACE = 6


@dataclass(frozen=True, slots=True)
class OsFacts:
    caption: str
    version: str
    build: int
    product_type: int
    sku: int
    edition_id: str


@dataclass(frozen=True, slots=True)
class LicenseFacts:
    name: str
    description: str
    product_key_channel: str | None
    partial_product_key: str | None
    license_status: LicenseStatus
    grace_minutes: int
    kms_machine: str | None
    kms_port: int
    discovered_kms_machine: str | None
    discovered_kms_port: int

    @property
    def channel(self) -> Channel:
        return channel_of(self.description)


@dataclass(frozen=True, slots=True)
class KmsProbe:
    host: str
    port: int
    reachable: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class AttestationFacts:
    """Azure Edition only: can the guest fetch IMDS's attested document and build its chain?

    Datacenter: Azure Edition shows the activation watermark, even after a good KMS activation,
    when IMDS (169.254.169.254) is unreachable or the signing certificate's chain cannot be built
    (missing intermediate certificates). ``chain_valid`` is None when the document was not fetched.
    """

    imds_reachable: bool
    chain_valid: bool | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    hresult: str  # "0x" + 8 upper-case hex digits

    @property
    def ok(self) -> bool:
        return self.hresult == "0x00000000"


@dataclass(frozen=True, slots=True)
class ScriptError:
    step: str
    hresult: str
    message: str


@dataclass(frozen=True, slots=True)
class BeforeFacts:
    """What a conditional re-key read before it compared (``preconditions.before``)."""

    edition_id: str
    sku: int
    build: int
    product_type: int
    product_key_channel: str | None
    license_status: LicenseStatus
    kms_reachable: bool


@dataclass(frozen=True, slots=True)
class Preconditions:
    """A conditional re-key's verdict on the facts it was given: met (then it acted) or not (then it
    changed nothing and the result's facts are the ones it read), and which facts differed."""

    met: bool
    failed: tuple[str, ...]
    before: BeforeFacts | None


@dataclass(frozen=True, slots=True)
class GuestResult:
    """One parsed result line."""

    script: str  # "detect" | "remediate"
    os: OsFacts | None
    license: LicenseFacts | None
    kms_probe: KmsProbe | None
    steps: tuple[Step, ...] = field(default_factory=tuple)
    error: ScriptError | None = None
    attestation: AttestationFacts | None = None  # reported for Azure Edition (EditionID ServerTurbine*) only
    preconditions: Preconditions | None = None  # a conditional re-key's only (guest contract)


def channel_of(description: str) -> Channel:
    """Map an SPP Description to a channel (table in docs/guest-contract.md)."""
    text = description.upper()
    if "VIRTUAL_MACHINE_ACTIVATION" in text:
        return Channel.AVMA
    if "VOLUME_KMSCLIENT" in text:
        return Channel.KMS_CLIENT
    if "VOLUME_MAK" in text:
        return Channel.MAK
    if "RETAIL" in text:
        return Channel.RETAIL
    if "OEM_" in text:
        return Channel.OEM
    return Channel.UNKNOWN


SCRIPT_NAMES = ("detect", "remediate")
# error.step values (docs/guest-contract.md); the parser accepts any text, the engine reads these.
POWERSHELL_VERSION_STEP = "powershell-version"  # the guard: Windows PowerShell older than 3.0
WRITE_RESULT_STEP = "write-result"  # building or writing the result line failed
_FIXED_LINE_STEPS = frozenset({POWERSHELL_VERSION_STEP, WRITE_RESULT_STEP})  # the two plain-string lines
# The remediation steps in the order the script runs them (docs/guest-contract.md).
STEP_NAMES = ("install-key", "clear-kms-cache", "set-kms-host", "set-kms-port", "refresh", "activate")
_HRESULT = re.compile(r"0x[0-9A-F]{8}")
_T = TypeVar("_T")

_TOP_KEYS = frozenset({"schema", "script", "os", "license", "kmsProbe", "attestation", "steps", "error"})
_OS_KEYS = frozenset({"caption", "version", "build", "productType", "sku", "editionId"})
_LICENSE_KEYS = frozenset(
    {
        "name",
        "description",
        "productKeyChannel",
        "partialProductKey",
        "licenseStatus",
        "graceMinutes",
        "kmsMachine",
        "kmsPort",
        "discoveredKmsMachine",
        "discoveredKmsPort",
    }
)
_PROBE_KEYS = frozenset({"host", "port", "reachable", "error"})
_ATTESTATION_KEYS = frozenset({"imdsReachable", "chainValid", "error"})
_STEP_KEYS = frozenset({"name", "hresult"})
_ERROR_KEYS = frozenset({"step", "hresult", "message"})
# A conditional re-key (remediate with the Expect* parameters) adds "preconditions".
PRECONDITIONS_KEY = "preconditions"
_PRECONDITION_KEYS = frozenset({"met", "failed", "before"})
_BEFORE_KEYS = frozenset(
    {"editionId", "sku", "build", "productType", "productKeyChannel", "licenseStatus", "kmsReachable"}
)
# The facts a conditional re-key compares, as the script names them in preconditions.failed
# ("facts": they could not be read at all).
PRECONDITION_NAMES = (
    "facts",
    "channel",
    "editionId",
    "sku",
    "build",
    "productType",
    "productKeyChannel",
    "kmsProbe",
)


def parse_result(output: str, *, expected_script: str) -> GuestResult:
    """Find the last marker line in ``output`` and parse it; raise :class:`GuestOutputError` otherwise.

    Run Command keeps only the last 4,096 bytes of output and the scripts print other text too, so
    only the last line that starts with the marker counts. The JSON is checked strictly (exact keys,
    exact types, bool is not int) because every decision the engine makes rests on these facts.
    """
    if expected_script not in SCRIPT_NAMES:
        raise ValueError(f"expected_script must be one of {SCRIPT_NAMES}, not {expected_script!r}")
    if not isinstance(output, str):
        raise GuestOutputError(f"output is {type(output).__name__}, not text")
    line = _last_marker_line(output)
    try:
        document = json.loads(
            line[len(RESULT_MARKER) :],
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except GuestOutputError:
        raise
    except (ValueError, RecursionError) as exc:
        raise GuestOutputError(f"the result line is not valid JSON: {exc}") from None
    return _result(document, expected_script)


def _last_marker_line(output: str) -> str:
    found: str | None = None
    for raw in output.split("\n"):
        line = raw.rstrip("\r")
        if line.startswith(RESULT_MARKER):
            found = line
    if found is None:
        raise GuestOutputError(
            f"no line starting with {RESULT_MARKER.strip()!r} in the output (script did not finish, "
            "or the line was cut off by the 4,096-byte output limit)"
        )
    return found


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise GuestOutputError(f"duplicate JSON key {key!r} in the result line")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise GuestOutputError(f"the result line holds {name}, which is not JSON")


def _object(value: object, where: str, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise GuestOutputError(f"{where}: expected an object, got {_kind(value)}")
    missing = sorted(keys - value.keys())
    if missing:
        raise GuestOutputError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(value.keys() - keys)
    if extra:
        raise GuestOutputError(f"{where}: unexpected field(s) {', '.join(extra)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise GuestOutputError(f"{where}: expected a string, got {_kind(value)}")
    # JSON may carry half a surrogate pair ("\ud83d" alone: a cut text, or a registry value); such a
    # str cannot be encoded, and printing or logging it would fail. It becomes U+FFFD.
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _int(value: object, where: str, low: int = 0, high: int = 2**32 - 1) -> int:
    # bool is a subclass of int in Python; JSON true must never count as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise GuestOutputError(f"{where}: expected an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise GuestOutputError(f"{where}: {value} is outside {low}..{high}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise GuestOutputError(f"{where}: expected true or false, got {_kind(value)}")
    return value


def _hresult(value: object, where: str) -> str:
    text = _str(value, where)
    if not _HRESULT.fullmatch(text):
        raise GuestOutputError(f"{where}: {text[:40]!r} is not 0x + 8 upper-case hex digits")
    return text


def _optional(value: object, where: str, read: Callable[[object, str], _T]) -> _T | None:
    return None if value is None else read(value, where)


def _result(document: object, expected_script: str) -> GuestResult:
    conditional = isinstance(document, dict) and PRECONDITIONS_KEY in document
    top = _object(document, "result", _TOP_KEYS | {PRECONDITIONS_KEY} if conditional else _TOP_KEYS)
    schema = _int(top["schema"], "schema")
    if schema != SCHEMA_VERSION:
        raise GuestOutputError(f"schema {schema} is not supported (this parser reads {SCHEMA_VERSION})")
    script = _str(top["script"], "script")
    if script != expected_script:
        raise GuestOutputError(f"the result line is from the {script[:40]!r} script, not {expected_script!r}")
    error = _optional(top["error"], "error", _script_error)
    os_facts = _optional(top["os"], "os", _os)
    license_facts = _optional(top["license"], "license", _license)
    probe = _optional(top["kmsProbe"], "kmsProbe", _probe)
    attestation = _optional(top["attestation"], "attestation", _attestation)
    steps = _steps(top["steps"], script)
    if error is None and (os_facts is None or probe is None):
        raise GuestOutputError("os and kmsProbe may only be null when error is set")
    # The two plain-string lines carry no facts and no steps (docs/guest-contract.md): facts next to
    # them contradict the line, and a hint built on them ("nothing was changed") would lie.
    reported = (
        (os_facts, license_facts, probe, attestation) != (None, None, None, None) or steps or conditional
    )
    if error is not None and error.step in _FIXED_LINE_STEPS and reported:
        raise GuestOutputError(
            f"error.step {error.step}: the script writes this line with no facts and no steps"
        )
    preconditions = None
    if conditional:
        if script != "remediate":
            raise GuestOutputError("preconditions: only a conditional re-key (remediate) reports them")
        preconditions = _preconditions(top[PRECONDITIONS_KEY], steps)
    return GuestResult(
        script=script,
        os=os_facts,
        license=license_facts,
        kms_probe=probe,
        steps=steps,
        error=error,
        attestation=attestation,
        preconditions=preconditions,
    )


def _preconditions(value: object, steps: tuple[Step, ...]) -> Preconditions:
    data = _object(value, "preconditions", _PRECONDITION_KEYS)
    met = _bool(data["met"], "preconditions.met")
    raw = data["failed"]
    if not isinstance(raw, list):
        raise GuestOutputError(f"preconditions.failed: expected an array, got {_kind(raw)}")
    failed = tuple(_str(item, f"preconditions.failed[{i}]") for i, item in enumerate(raw))
    unknown = [name for name in failed if name not in PRECONDITION_NAMES]
    if unknown or len(set(failed)) != len(failed):
        raise GuestOutputError(f"preconditions.failed: unknown or repeated names {list(failed)[:8]}")
    before = _optional(data["before"], "preconditions.before", _before)
    if met and (failed or before is None):
        raise GuestOutputError("preconditions: met, yet a fact failed or none was read")
    if met and (not steps or steps[0].name != "install-key"):
        raise GuestOutputError("preconditions: met, so the steps start with install-key")
    if not met and (not failed or steps):
        raise GuestOutputError("preconditions: not met, so a fact failed and nothing was done")
    if before is None and "facts" not in failed:
        raise GuestOutputError("preconditions.before: null only when the facts could not be read")
    return Preconditions(met=met, failed=failed, before=before)


def _before(value: object, where: str) -> BeforeFacts:
    data = _object(value, where, _BEFORE_KEYS)
    status = _int(data["licenseStatus"], f"{where}.licenseStatus", 0, max(LicenseStatus))
    return BeforeFacts(
        edition_id=_str(data["editionId"], f"{where}.editionId"),
        sku=_int(data["sku"], f"{where}.sku"),
        build=_int(data["build"], f"{where}.build"),
        product_type=_int(data["productType"], f"{where}.productType"),
        product_key_channel=_optional(data["productKeyChannel"], f"{where}.productKeyChannel", _str),
        license_status=LicenseStatus(status),
        kms_reachable=_bool(data["kmsReachable"], f"{where}.kmsReachable"),
    )


def _os(value: object, where: str) -> OsFacts:
    data = _object(value, where, _OS_KEYS)
    return OsFacts(
        caption=_str(data["caption"], f"{where}.caption"),
        version=_str(data["version"], f"{where}.version"),
        build=_int(data["build"], f"{where}.build"),
        product_type=_int(data["productType"], f"{where}.productType"),
        sku=_int(data["sku"], f"{where}.sku"),
        edition_id=_str(data["editionId"], f"{where}.editionId"),
    )


def _license(value: object, where: str) -> LicenseFacts:
    data = _object(value, where, _LICENSE_KEYS)
    status = _int(data["licenseStatus"], f"{where}.licenseStatus", 0, max(LicenseStatus))
    return LicenseFacts(
        name=_str(data["name"], f"{where}.name"),
        description=_str(data["description"], f"{where}.description"),
        product_key_channel=_optional(data["productKeyChannel"], f"{where}.productKeyChannel", _str),
        partial_product_key=_optional(data["partialProductKey"], f"{where}.partialProductKey", _str),
        license_status=LicenseStatus(status),
        grace_minutes=_int(data["graceMinutes"], f"{where}.graceMinutes"),
        kms_machine=_optional(data["kmsMachine"], f"{where}.kmsMachine", _str),
        kms_port=_int(data["kmsPort"], f"{where}.kmsPort", 0, 65535),
        discovered_kms_machine=_optional(data["discoveredKmsMachine"], f"{where}.discoveredKmsMachine", _str),
        discovered_kms_port=_int(data["discoveredKmsPort"], f"{where}.discoveredKmsPort", 0, 65535),
    )


def _probe(value: object, where: str) -> KmsProbe:
    data = _object(value, where, _PROBE_KEYS)
    return KmsProbe(
        host=_str(data["host"], f"{where}.host"),
        port=_int(data["port"], f"{where}.port", 0, 65535),
        reachable=_bool(data["reachable"], f"{where}.reachable"),
        error=_optional(data["error"], f"{where}.error", _str),
    )


def _attestation(value: object, where: str) -> AttestationFacts:
    data = _object(value, where, _ATTESTATION_KEYS)
    reachable = _bool(data["imdsReachable"], f"{where}.imdsReachable")
    chain = _optional(data["chainValid"], f"{where}.chainValid", _bool)
    if not reachable and chain is not None:
        raise GuestOutputError(f"{where}.chainValid: must be null when IMDS was not reached")
    if reachable and chain is None:
        # the script sets it false as soon as the document came (docs/guest-contract.md)
        raise GuestOutputError(f"{where}.chainValid: must be true or false when IMDS was reached")
    return AttestationFacts(
        imds_reachable=reachable,
        chain_valid=chain,
        error=_optional(data["error"], f"{where}.error", _str),
    )


def _steps(value: object, script: str) -> tuple[Step, ...]:
    if not isinstance(value, list):
        raise GuestOutputError(f"steps: expected an array, got {_kind(value)}")
    if script == "detect" and value:
        raise GuestOutputError("steps: the detect script changes nothing, so it reports no steps")
    steps: list[Step] = []
    for index, item in enumerate(value):
        where = f"steps[{index}]"
        data = _object(item, where, _STEP_KEYS)
        name = _str(data["name"], f"{where}.name")
        if name not in STEP_NAMES:
            raise GuestOutputError(f"{where}.name: unknown step {name[:40]!r}")
        steps.append(Step(name=name, hresult=_hresult(data["hresult"], f"{where}.hresult")))
    order = [STEP_NAMES.index(step.name) for step in steps]
    if order != sorted(set(order)):
        raise GuestOutputError("steps: not in the contract order, or a step appears twice")
    if any(not step.ok for step in steps[:-1]):
        raise GuestOutputError("steps: a step follows a failed step (the script stops at the first failure)")
    return tuple(steps)


def _script_error(value: object, where: str) -> ScriptError:
    data = _object(value, where, _ERROR_KEYS)
    return ScriptError(
        step=_str(data["step"], f"{where}.step"),
        hresult=_hresult(data["hresult"], f"{where}.hresult"),
        message=_str(data["message"], f"{where}.message"),
    )
