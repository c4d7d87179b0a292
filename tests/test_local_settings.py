"""local.settings.json.example: every setting the app reads and the Bicep sets, and nothing else.

No Functions host runs here (the end-to-end tests call the functions themselves), so the example is
held to the code and the infrastructure instead, both ways, with the sets derived where they live:
the settings the engine reads (tests/test_infra_contract.py scans shared/ for them), the ones the
host reads (function_app.py's connection and %SCHEDULE% names), the Function App's app settings
(infra/app/api.bicep), and what ``avma-remediator simulator serve`` prints (the simulator's env()).
Filled in with what the simulator prints and Azurite, the example is a configuration the engine
accepts.
"""

from __future__ import annotations

import json
from typing import Any

from shared.settings import Settings
from simulator import Estate, Simulator
from tests.test_infra_contract import bicep_settings, code_settings, host_settings
from tests.test_infra_lib import ROOT

EXAMPLE = ROOT / "local.settings.json.example"
PLACEHOLDER = "<printed by avma-remediator simulator serve>"

# Set in Azure, deliberately not in a local run, with the reason.
AZURE_ONLY = {
    "AzureWebJobsStorage__credential": "identity-based storage: locally AzureWebJobsStorage is Azurite's connection string",
    "AzureWebJobsStorage__clientId": "identity-based storage (as above)",
    "AzureWebJobsStorage__blobServiceUri": "identity-based storage (as above)",
    "AzureWebJobsStorage__queueServiceUri": "identity-based storage (as above)",
    "AzureWebJobsStorage__tableServiceUri": "identity-based storage (as above)",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "no Application Insights locally: logs go to the func console",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "no Application Insights locally",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "OpenTelemetry output cannot run under Core Tools (opentelemetry-howto.md, Considerations)",
}
# In the example, read neither by the engine nor by a function binding, with the reader.
LOCAL_ONLY = {
    "FUNCTIONS_WORKER_RUNTIME": "Core Tools: the worker to start (python)",
    "AzureWebJobsFeatureFlags": "the host: EnableWorkerIndexing, the Python v2 programming model",
    "IDENTITY_HEADER": "azure-identity's ManagedIdentityCredential, with IDENTITY_ENDPOINT (the simulator's identity)",
}


def example() -> dict[str, str]:
    data: dict[str, Any] = json.loads(EXAMPLE.read_text())
    assert data["IsEncrypted"] is False
    values: dict[str, str] = data["Values"]
    assert all(isinstance(v, str) for v in values.values())
    return values


def simulator_env() -> dict[str, str]:
    return Simulator(Estate.default()).env()  # the keys serve prints (values once it runs)


def test_the_example_holds_every_setting_the_code_reads_and_the_bicep_sets_and_nothing_else() -> None:
    wanted = (code_settings() | set(bicep_settings()) | set(simulator_env())) - set(AZURE_ONLY)
    missing = wanted - set(example())
    assert missing == set(), f"add these to local.settings.json.example: {sorted(missing)}"
    readers = code_settings() | host_settings() | set(simulator_env()) | set(LOCAL_ONLY)
    unread = set(example()) - readers
    assert unread == set(), f"nothing reads these: {sorted(unread)}"


def test_the_azure_only_settings_are_set_by_the_bicep_and_left_out_locally() -> None:
    assert set(AZURE_ONLY) <= set(bicep_settings()) | code_settings()
    assert set(AZURE_ONLY).isdisjoint(example())
    assert set(LOCAL_ONLY).isdisjoint(code_settings() | set(bicep_settings()))


def test_the_placeholders_are_what_the_simulator_prints_and_filled_in_the_example_is_valid(
    simulator: Simulator,
) -> None:
    placeholders = {k for k, v in example().items() if v == PLACEHOLDER}
    assert placeholders == set(simulator_env()) - {"AZURE_CLIENT_ID"}
    assert "IDENTITY_ENDPOINT" in placeholders and "AZURE_CA_BUNDLE" in placeholders
    env = {**example(), **simulator.env()}
    assert PLACEHOLDER not in env.values()
    settings = Settings.from_env(env)
    assert settings.storage_connection == "UseDevelopmentStorage=true"  # Azurite's well-known account
    assert settings.mode.value == "audit"
    assert settings.arm_endpoint == simulator.env()["ARM_ENDPOINT"]
    assert settings.ca_bundle == simulator.env()["AZURE_CA_BUNDLE"]


def test_the_readme_says_how_to_run_the_app_locally() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the app locally", 1)[1].split("\n## ", 1)[0]
    for step in ("azurite", "avma-remediator simulator serve", "func start", "local.settings.json.example"):
        assert step in section
