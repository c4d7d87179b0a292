"""Per-cloud endpoints: ARM, Log Analytics and the Azure KMS (sources: docs/troubleshooting.md)."""

from __future__ import annotations

from dataclasses import dataclass


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
    # is not on a custom KMS), and the addresses operators must route directly (custom routes).
    azure_kms_hosts: tuple[str, ...]
    kms_ips: tuple[str, ...]


# Endpoints: troubleshoot-activation-problems.md and custom-routes-enable-kms-activation.md
# (MicrosoftDocs/SupportArticles-docs); ARM/Log Analytics: Azure SDK cloud settings.
CLOUDS: dict[str, CloudProfile] = {
    "AzureCloud": CloudProfile(
        name="AzureCloud",
        arm_endpoint="https://management.azure.com",
        arm_scope="https://management.azure.com/.default",
        authority_host="login.microsoftonline.com",
        log_analytics_endpoint="https://api.loganalytics.io/v1",
        log_analytics_audience="https://api.loganalytics.io",
        kms_host="azkms.core.windows.net",
        kms_port=1688,
        azure_kms_hosts=("azkms.core.windows.net", "kms.core.windows.net"),
        kms_ips=("20.118.99.224", "40.83.235.53", "23.102.135.246"),
    ),
    "AzureUSGovernment": CloudProfile(
        name="AzureUSGovernment",
        arm_endpoint="https://management.usgovcloudapi.net",
        arm_scope="https://management.usgovcloudapi.net/.default",
        authority_host="login.microsoftonline.us",
        log_analytics_endpoint="https://api.loganalytics.us/v1",
        log_analytics_audience="https://api.loganalytics.us",
        kms_host="kms.core.usgovcloudapi.net",
        kms_port=1688,
        azure_kms_hosts=("kms.core.usgovcloudapi.net", "azkms.core.usgovcloudapi.net"),
        kms_ips=("23.97.0.13", "52.126.105.2"),
    ),
    "AzureChinaCloud": CloudProfile(
        name="AzureChinaCloud",
        arm_endpoint="https://management.chinacloudapi.cn",
        arm_scope="https://management.chinacloudapi.cn/.default",
        authority_host="login.chinacloudapi.cn",
        log_analytics_endpoint="https://api.loganalytics.azure.cn/v1",
        log_analytics_audience="https://api.loganalytics.azure.cn",
        kms_host="azkms.core.chinacloudapi.cn",
        kms_port=1688,
        azure_kms_hosts=("azkms.core.chinacloudapi.cn", "kms.core.chinacloudapi.cn"),
        kms_ips=("159.27.28.100", "163.228.64.161", "42.159.7.249"),
    ),
}
