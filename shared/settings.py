"""Every setting the engine reads, read once from the environment and validated up front.

A bad value stops the run before anything touches a VM (the CLI exits 2), and every problem is
reported at once rather than one per attempt.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from shared.clouds import CLOUDS, CloudProfile
from shared.model import is_guid, is_host_name

# Azure tag names may not contain < > % & \ ? /
_TAG_NAME = re.compile(r"^[^<>%&\\?/]{1,512}$")
# Ledger writes (history rows, lease release) are retried with backoff before the invocation gives
# up and lets the host retry the message; each try has its own deadline. Their worst case counts in
# the workflow's budget (Settings.workflow_worst_case_s).
LEDGER_TRIES = 3
LEDGER_TRY_TIMEOUT_S = 10.0
LEDGER_BACKOFF_S = 0.5  # then doubled: 0.5 s, 1 s
LEDGER_WRITE_BUDGET_S = LEDGER_TRIES * LEDGER_TRY_TIMEOUT_S + LEDGER_BACKOFF_S * (
    (1 << (LEDGER_TRIES - 1)) - 1
)
# Ledger operations of one workflow: acquire, renew before each of two Run Commands, the intent row,
# the outcome row and the release.
LEDGER_OPS_PER_WORKFLOW = 6
HOST_FUNCTION_TIMEOUT_S = 3600.0  # host.json "functionTimeout" (checked by tests/test_settings.py)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def is_subscription_id(text: str) -> bool:
    """Subscription ids are GUIDs."""
    return is_guid(text)


class ConfigError(ValueError):
    """One or more settings are missing or invalid; the message lists each problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class Mode(enum.StrEnum):
    """``audit`` never changes a VM; ``enforce`` remediates."""

    AUDIT = "audit"
    ENFORCE = "enforce"


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one engine instance."""

    cloud: CloudProfile
    mode: Mode = Mode.AUDIT
    arm_endpoint: str = ""
    ca_bundle: str | None = None
    subscriptions: tuple[str, ...] = ()
    opt_out_tag: str = "avma-remediator-opt-out"
    allow_custom_kms_override: bool = False
    kms_host: str = ""
    kms_port: int = 1688
    max_concurrency: int = 16
    run_command_timeout_s: float = 900.0
    poll_interval_s: float = 10.0
    arm_timeout_s: float = 60.0  # deadline of every other ARM call (a VM read, a list page), retries included
    lease_seconds: float | None = None  # LEASE_SECONDS; None: derived from the Run Command timeout
    function_timeout_s: float = HOST_FUNCTION_TIMEOUT_S  # the host's functionTimeout
    # The event-driven app (Functions): storage, ledger, log scan, sweep, retries.
    storage_connection: str | None = None  # AzureWebJobsStorage (Azurite / connection string)
    queue_service_uri: str | None = None  # AzureWebJobsStorage__queueServiceUri (identity-based)
    table_service_uri: str | None = None  # AzureWebJobsStorage__tableServiceUri (identity-based)
    storage_client_id: str | None = None  # AzureWebJobsStorage__clientId (user-assigned identity)
    ledger_table: str = "avmaledger"
    workspace_id: str | None = None
    log_analytics_endpoint: str = ""
    log_scan_lookback_s: float = 3600.0
    log_scan_overlap_s: float = 600.0
    management_group: str | None = None
    recheck_after_s: float = 86400.0
    defer_delay_s: float = 300.0
    defer_deadline_s: float = 86400.0
    # Issue 9 (input and scope): caps on fan-out.
    max_targets_per_alert: int = 100
    # The global cap on concurrent workflows across every instance. Not enforced here: the Bicep
    # derives Flex's maximumInstanceCount from it and host.json's per-instance queue concurrency
    # (docs/operations.md, "Caps"); stated as a setting so that it is on record and checked.
    max_concurrent_workflows: int = 2400

    @property
    def lease_s(self) -> float:
        """A lease outlives the longest workflow (two Run Commands and their reads) with a margin."""
        if self.lease_seconds is not None:
            return self.lease_seconds
        return 2 * self.run_command_timeout_s + 300.0

    @property
    def workflow_worst_case_s(self) -> float:
        """The longest one work item can take: a VM read, two Run Commands (each bounded by its
        deadline) and every ledger operation at its worst (all tries, all backoff)."""
        return (
            self.arm_timeout_s
            + 2 * self.run_command_timeout_s
            + LEDGER_OPS_PER_WORKFLOW * LEDGER_WRITE_BUDGET_S
        )

    @property
    def kms_target(self) -> str:
        return f"{self.kms_host}:{self.kms_port}"

    def with_mode(self, mode: Mode) -> Settings:
        return replace(self, mode=mode)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise :class:`ConfigError` naming each bad one."""
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        cloud_name = get("AZURE_CLOUD", "AzureCloud") or "AzureCloud"
        cloud = CLOUDS.get(cloud_name)
        if cloud is None:
            problems.append(f"AZURE_CLOUD={cloud_name!r}: expected one of {', '.join(CLOUDS)}")
            cloud = CLOUDS["AzureCloud"]

        mode_text = get("REMEDIATION_MODE", "audit").lower() or "audit"
        try:
            mode = Mode(mode_text)
        except ValueError:
            problems.append(f"REMEDIATION_MODE={mode_text!r}: expected 'audit' or 'enforce'")
            mode = Mode.AUDIT

        arm_endpoint = get("ARM_ENDPOINT") or cloud.arm_endpoint
        if not arm_endpoint.startswith("https://"):
            problems.append(f"ARM_ENDPOINT={arm_endpoint!r}: must be an https:// URL")
        arm_endpoint = arm_endpoint.rstrip("/")

        ca_bundle = get("AZURE_CA_BUNDLE") or None
        if ca_bundle is not None and not _is_file(ca_bundle):
            problems.append(f"AZURE_CA_BUNDLE={ca_bundle[:200]!r}: no such file")

        subscriptions = tuple(s for s in re.split(r"[\s,;]+", get("TARGET_SUBSCRIPTIONS")) if s)
        for sub in subscriptions:
            if not is_guid(sub):
                problems.append(f"TARGET_SUBSCRIPTIONS: {sub[:60]!r} is not a subscription id (GUID)")

        opt_out_tag = get("OPT_OUT_TAG", "avma-remediator-opt-out")
        if not _TAG_NAME.match(opt_out_tag):
            problems.append(f"OPT_OUT_TAG={opt_out_tag!r}: not a valid Azure tag name")

        allow_override = _bool(get("ALLOW_CUSTOM_KMS_OVERRIDE"), "ALLOW_CUSTOM_KMS_OVERRIDE", problems)

        kms_host = get("KMS_HOST") or cloud.kms_host
        if not is_host_name(kms_host):
            problems.append(f"KMS_HOST={kms_host[:80]!r}: not a host name")
        kms_port = _number(get("KMS_PORT"), "KMS_PORT", cloud.kms_port, 1, 65535, problems, whole=True)
        concurrency = _number(get("MAX_CONCURRENCY"), "MAX_CONCURRENCY", 16, 1, 512, problems, whole=True)
        timeout = _number(
            get("RUN_COMMAND_TIMEOUT_SECONDS"), "RUN_COMMAND_TIMEOUT_SECONDS", 900, 0.01, 5400, problems
        )
        poll = _number(get("POLL_INTERVAL_SECONDS"), "POLL_INTERVAL_SECONDS", 10, 0.0, 300, problems)
        arm_timeout = _number(
            get("ARM_CALL_TIMEOUT_SECONDS"), "ARM_CALL_TIMEOUT_SECONDS", 60, 0.01, 900, problems
        )
        lease_text = get("LEASE_SECONDS")
        lease = _number(lease_text, "LEASE_SECONDS", 0, 1, 86400, problems) if lease_text else None
        function_timeout = _host_timespan(
            get("AzureFunctionsJobHost__functionTimeout"), "AzureFunctionsJobHost__functionTimeout", problems
        )

        storage_connection = get("AzureWebJobsStorage") or None
        queue_uri = get("AzureWebJobsStorage__queueServiceUri") or None
        table_uri = get("AzureWebJobsStorage__tableServiceUri") or None
        for name, uri in (("queueServiceUri", queue_uri), ("tableServiceUri", table_uri)):
            if uri is not None and not uri.startswith("https://"):
                problems.append(f"AzureWebJobsStorage__{name}={uri!r}: must be an https:// URL")
        ledger_table = get("LEDGER_TABLE", "avmaledger") or "avmaledger"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", ledger_table):
            problems.append(f"LEDGER_TABLE={ledger_table!r}: 3-63 letters and digits, starting with a letter")
        workspace_id = get("LOG_ANALYTICS_WORKSPACE_ID") or None
        if workspace_id is not None and not is_guid(workspace_id):
            problems.append(f"LOG_ANALYTICS_WORKSPACE_ID={workspace_id[:60]!r}: not a workspace id (GUID)")
        la_endpoint = (get("LOG_ANALYTICS_ENDPOINT") or cloud.log_analytics_endpoint).rstrip("/")
        if not la_endpoint.startswith("https://"):
            problems.append(f"LOG_ANALYTICS_ENDPOINT={la_endpoint!r}: must be an https:// URL")
        management_group = get("MANAGEMENT_GROUP_ID") or None
        if management_group is not None and not re.fullmatch(r"[-\w.()]{1,90}", management_group):
            problems.append(f"MANAGEMENT_GROUP_ID={management_group[:60]!r}: not a management group id")
        lookback = _number(
            get("LOG_SCAN_LOOKBACK_MINUTES"), "LOG_SCAN_LOOKBACK_MINUTES", 60, 1, 10080, problems
        )
        overlap = _number(get("LOG_SCAN_OVERLAP_MINUTES"), "LOG_SCAN_OVERLAP_MINUTES", 10, 0, 1440, problems)
        recheck = _number(get("RECHECK_AFTER_HOURS"), "RECHECK_AFTER_HOURS", 24, 0, 8760, problems)
        defer_delay = _number(get("DEFER_DELAY_SECONDS"), "DEFER_DELAY_SECONDS", 300, 0, 604800, problems)
        deadline = _number(get("DEFER_DEADLINE_HOURS"), "DEFER_DEADLINE_HOURS", 24, 0, 720, problems)
        max_targets = _number(
            get("MAX_TARGETS_PER_ALERT"), "MAX_TARGETS_PER_ALERT", 100, 1, 10000, problems, whole=True
        )
        workflows = _number(
            get("MAX_CONCURRENT_WORKFLOWS"),
            "MAX_CONCURRENT_WORKFLOWS",
            2400,
            1,
            1000 * 64,
            problems,
            whole=True,
        )

        if not problems:
            # The worst-case workflow must end before its lease does (or a second delivery could take
            # the VM while this one still runs a command) and before the host kills the invocation.
            budget = replace(
                cls(cloud=cloud),
                run_command_timeout_s=float(timeout),
                arm_timeout_s=float(arm_timeout),
                lease_seconds=lease,
                function_timeout_s=function_timeout,
            )
            worst = budget.workflow_worst_case_s
            if worst > budget.lease_s:
                problems.append(
                    f"LEASE_SECONDS={budget.lease_s:g}: shorter than the worst-case workflow ({worst:g} s: "
                    "ARM_CALL_TIMEOUT_SECONDS + 2 x RUN_COMMAND_TIMEOUT_SECONDS + the ledger's retries)"
                )
            if worst > function_timeout:
                problems.append(
                    f"functionTimeout ({function_timeout:g} s, host.json or "
                    f"AzureFunctionsJobHost__functionTimeout) is shorter than the worst-case workflow "
                    f"({worst:g} s): lower RUN_COMMAND_TIMEOUT_SECONDS"
                )
        if problems:
            raise ConfigError(problems)
        return cls(
            cloud=cloud,
            mode=mode,
            arm_endpoint=arm_endpoint,
            ca_bundle=ca_bundle,
            subscriptions=subscriptions,
            opt_out_tag=opt_out_tag,
            allow_custom_kms_override=allow_override,
            kms_host=kms_host.lower(),
            kms_port=int(kms_port),
            max_concurrency=int(concurrency),
            run_command_timeout_s=float(timeout),
            poll_interval_s=float(poll),
            arm_timeout_s=float(arm_timeout),
            lease_seconds=lease,
            function_timeout_s=function_timeout,
            storage_connection=storage_connection,
            queue_service_uri=queue_uri,
            table_service_uri=table_uri,
            storage_client_id=get("AzureWebJobsStorage__clientId") or None,
            ledger_table=ledger_table,
            workspace_id=workspace_id,
            log_analytics_endpoint=la_endpoint,
            log_scan_lookback_s=lookback * 60,
            log_scan_overlap_s=overlap * 60,
            management_group=management_group,
            recheck_after_s=recheck * 3600,
            defer_delay_s=float(defer_delay),
            defer_deadline_s=deadline * 3600,
            max_targets_per_alert=int(max_targets),
            max_concurrent_workflows=int(workflows),
        )


def _is_file(path: str) -> bool:
    """Whether ``path`` names a readable file; pathlib raises for some names (too long, no access)."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


def _host_timespan(text: str, name: str, problems: list[str]) -> float:
    """``functionTimeout`` as the host reads it: ``[d.]hh:mm:ss`` (hours 0-23, as .NET's timespan
    format), or ``-1`` for no limit (functions-host-json.md, "functionTimeout"); empty: host.json's."""
    if not text:
        return HOST_FUNCTION_TIMEOUT_S
    if text == "-1":
        return math.inf
    match = re.fullmatch(r"(?:(\d{1,7})\.)?([01]?\d|2[0-3]):([0-5]\d):([0-5]\d)", text)
    if match is None:
        problems.append(f"{name}={text[:40]!r}: expected hh:mm:ss (or d.hh:mm:ss, or -1 for no limit)")
        return HOST_FUNCTION_TIMEOUT_S
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _bool(text: str, name: str, problems: list[str]) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low not in _FALSE:
        problems.append(f"{name}={text!r}: expected true or false")
    return False


def _number(
    text: str,
    name: str,
    default: float,
    low: float,
    high: float,
    problems: list[str],
    *,
    whole: bool = False,
) -> float:
    if not text:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        problems.append(f"{name}={text!r}: expected a {'whole ' if whole else ''}number")
        return default
    if not low <= value <= high:
        problems.append(f"{name}={text!r}: must be between {low:g} and {high:g}")
        return default
    return value


# Names the Functions bindings, the infrastructure and the code must agree on.
WORK_QUEUE = "vm-checks"
POISON_QUEUE = "vm-checks-poison"  # the Functions host's "<queue>-poison" convention
