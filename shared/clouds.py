"""Per-cloud endpoints: ARM, Log Analytics and the Azure KMS (sources: docs/troubleshooting.md).

The KMS names, addresses and port come from the one table in shared/kms_endpoints.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.kms_endpoints import kms_of


@dataclass(frozen=True, slots=True)
class CloudProfile:
    """Everything that differs between Azure clouds for this product."""

    name: str
    arm_endpoint: str
    arm_scope: str
    authority_host: str
    log_analytics_endpoint: str
    log_analytics_audience: str
    kms_host: str
    kms_port: int
    # Every host name that counts as "the Azure KMS" of this cloud (a VM pointing at one of these
    # is not on a custom KMS), the addresses operators must route directly (custom routes), and the
    # retired ones (still "the Azure KMS" when a VM names one, but routing only them reaches none).
    azure_kms_hosts: tuple[str, ...]
    kms_ips: tuple[str, ...]
    retired_kms_ips: tuple[str, ...] = ()


# KMS: shared/kms_endpoints.py (its sources and date); ARM/Log Analytics: Azure SDK cloud settings.
CLOUDS: dict[str, CloudProfile] = {
    "AzureCloud": CloudProfile(
        name="AzureCloud",
        arm_endpoint="https://management.azure.com",
        arm_scope="https://management.azure.com/.default",
        authority_host="login.microsoftonline.com",
        log_analytics_endpoint="https://api.loganalytics.io/v1",
        log_analytics_audience="https://api.loganalytics.io",
        kms_host=kms_of("AzureCloud").default_host,
        kms_port=kms_of("AzureCloud").port,
        azure_kms_hosts=kms_of("AzureCloud").hosts,
        kms_ips=kms_of("AzureCloud").required,
        retired_kms_ips=kms_of("AzureCloud").retired,
    ),
    "AzureUSGovernment": CloudProfile(
        name="AzureUSGovernment",
        arm_endpoint="https://management.usgovcloudapi.net",
        arm_scope="https://management.usgovcloudapi.net/.default",
        authority_host="login.microsoftonline.us",
        log_analytics_endpoint="https://api.loganalytics.us/v1",
        log_analytics_audience="https://api.loganalytics.us",
        kms_host=kms_of("AzureUSGovernment").default_host,
        kms_port=kms_of("AzureUSGovernment").port,
        azure_kms_hosts=kms_of("AzureUSGovernment").hosts,
        kms_ips=kms_of("AzureUSGovernment").required,
        retired_kms_ips=kms_of("AzureUSGovernment").retired,
    ),
    "AzureChinaCloud": CloudProfile(
        name="AzureChinaCloud",
        arm_endpoint="https://management.chinacloudapi.cn",
        arm_scope="https://management.chinacloudapi.cn/.default",
        authority_host="login.chinacloudapi.cn",
        log_analytics_endpoint="https://api.loganalytics.azure.cn/v1",
        log_analytics_audience="https://api.loganalytics.azure.cn",
        kms_host=kms_of("AzureChinaCloud").default_host,
        kms_port=kms_of("AzureChinaCloud").port,
        azure_kms_hosts=kms_of("AzureChinaCloud").hosts,
        kms_ips=kms_of("AzureChinaCloud").required,
        retired_kms_ips=kms_of("AzureChinaCloud").retired,
    ),
}
