"""Settings are read once, validated up front, and every problem is named."""

from __future__ import annotations

import pytest

from shared.clouds import CLOUDS
from shared.settings import ConfigError, Mode, Settings


def test_defaults_are_safe_audit_mode_on_the_public_cloud() -> None:
    s = Settings.from_env({})
    assert s.mode is Mode.AUDIT
    assert s.cloud.name == "AzureCloud"
    assert s.kms_target == "azkms.core.windows.net:1688"
    assert s.arm_endpoint == "https://management.azure.com"
    assert not s.allow_custom_kms_override


@pytest.mark.parametrize(
    ("cloud", "arm", "kms", "la"),
    [
        (
            "AzureCloud",
            "https://management.azure.com",
            "azkms.core.windows.net",
            "https://api.loganalytics.io",
        ),
        (
            "AzureUSGovernment",
            "https://management.usgovcloudapi.net",
            "kms.core.usgovcloudapi.net",
            "https://api.loganalytics.us",
        ),
        (
            "AzureChinaCloud",
            "https://management.chinacloudapi.cn",
            "azkms.core.chinacloudapi.cn",
            "https://api.loganalytics.azure.cn",
        ),
    ],
)
def test_cloud_profiles(cloud: str, arm: str, kms: str, la: str) -> None:
    s = Settings.from_env({"AZURE_CLOUD": cloud})
    assert (s.arm_endpoint, s.kms_host, s.cloud.log_analytics_audience) == (arm, kms, la)
    assert s.cloud.arm_scope == arm + "/.default"
    assert s.kms_port == 1688
    assert kms in s.cloud.azure_kms_hosts


def test_every_cloud_lists_kms_addresses_for_the_route_hint() -> None:
    for profile in CLOUDS.values():
        assert profile.kms_ips and all(ip.count(".") == 3 for ip in profile.kms_ips)


def test_enforce_mode_and_overrides() -> None:
    s = Settings.from_env(
        {
            "REMEDIATION_MODE": "Enforce",
            "TARGET_SUBSCRIPTIONS": "11111111-1111-1111-1111-111111111111, 22222222-2222-2222-2222-222222222222",
            "KMS_HOST": "KMS.Example.Net",
            "KMS_PORT": "1700",
            "ALLOW_CUSTOM_KMS_OVERRIDE": "yes",
            "MAX_CONCURRENCY": "64",
        }
    )
    assert s.mode is Mode.ENFORCE
    assert len(s.subscriptions) == 2
    assert s.kms_target == "kms.example.net:1700"
    assert s.allow_custom_kms_override and s.max_concurrency == 64


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {
                "AZURE_CLOUD": "AzureGermany",
                "REMEDIATION_MODE": "fix-everything",
                "TARGET_SUBSCRIPTIONS": "not-a-guid",
                "KMS_HOST": "evil.example; Remove-Item C:\\",
                "KMS_PORT": "70000",
                "ALLOW_CUSTOM_KMS_OVERRIDE": "maybe",
                "MAX_CONCURRENCY": "many",
                "ARM_ENDPOINT": "http://insecure.example",
                "AZURE_CA_BUNDLE": "/nonexistent/ca.pem",
                "OPT_OUT_TAG": "bad/tag",
            }
        )
    text = str(caught.value)
    for name in [
        "AZURE_CLOUD",
        "REMEDIATION_MODE",
        "TARGET_SUBSCRIPTIONS",
        "KMS_HOST",
        "KMS_PORT",
        "ALLOW_CUSTOM_KMS_OVERRIDE",
        "MAX_CONCURRENCY",
        "ARM_ENDPOINT",
        "AZURE_CA_BUNDLE",
        "OPT_OUT_TAG",
    ]:
        assert name in text, name
    assert len(caught.value.problems) == 10


def test_max_targets_per_alert_defaults_to_100_and_is_validated() -> None:
    assert Settings.from_env({}).max_targets_per_alert == 100
    assert Settings.from_env({"MAX_TARGETS_PER_ALERT": "7"}).max_targets_per_alert == 7
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(ConfigError, match="MAX_TARGETS_PER_ALERT"):
            Settings.from_env({"MAX_TARGETS_PER_ALERT": bad})


# --- the lease and the host's functionTimeout (issue 9, item 2) ------------------------------------


def _host_function_timeout_s() -> float:
    import json
    from pathlib import Path

    text = json.loads((Path(__file__).resolve().parent.parent / "host.json").read_text())["functionTimeout"]
    hours, minutes, seconds = (int(part) for part in text.split(":"))
    return float(hours * 3600 + minutes * 60 + seconds)


def test_the_default_worst_case_workflow_fits_the_lease_and_host_json_function_timeout() -> None:
    s = Settings.from_env({})
    assert s.function_timeout_s == _host_function_timeout_s()  # the default is host.json's own value
    # a VM read, two Run Commands at their deadlines and every ledger write at its worst
    assert s.workflow_worst_case_s >= s.arm_timeout_s + 2 * s.run_command_timeout_s
    assert s.workflow_worst_case_s <= s.lease_s <= s.function_timeout_s


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"LEASE_SECONDS": "600"}, "LEASE_SECONDS=600: shorter than the worst-case workflow"),
        ({"RUN_COMMAND_TIMEOUT_SECONDS": "1700"}, "functionTimeout (3600 s"),
        ({"AzureFunctionsJobHost__functionTimeout": "00:10:00"}, "functionTimeout (600 s"),
        ({"ARM_CALL_TIMEOUT_SECONDS": "900", "LEASE_SECONDS": "2100"}, "LEASE_SECONDS=2100"),
        ({"AzureFunctionsJobHost__functionTimeout": "forever"}, "expected hh:mm:ss"),
    ],
)
def test_settings_whose_worst_case_workflow_outlives_the_lease_or_the_host_are_refused(
    env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert any(problem in p for p in raised.value.problems), raised.value.problems


def test_a_longer_function_timeout_admits_a_longer_run_command_timeout() -> None:
    s = Settings.from_env(
        {"RUN_COMMAND_TIMEOUT_SECONDS": "1700", "AzureFunctionsJobHost__functionTimeout": "02:00:00"}
    )
    assert s.function_timeout_s == 7200
    assert s.workflow_worst_case_s <= s.lease_s <= 7200


def test_max_concurrent_workflows_defaults_to_2400_and_is_validated() -> None:
    assert Settings.from_env({}).max_concurrent_workflows == 2400
    assert Settings.from_env({"MAX_CONCURRENT_WORKFLOWS": "960"}).max_concurrent_workflows == 960
    for wrong in ("0", "-1", "1.5", "64001", "lots"):
        with pytest.raises(ConfigError, match="MAX_CONCURRENT_WORKFLOWS"):
            Settings.from_env({"MAX_CONCURRENT_WORKFLOWS": wrong})
