"""The azd hooks, run for real with a stub `az` on PATH (a tiny sh script that logs its arguments).

What matters: a hook that runs without a signed-in Azure CLI says so in one line and stops, before
it reads anything or calls anything else (it used to complain about AZURE_SUBSCRIPTION_ID, or wait
five minutes for functions it could not list); TARGET_SUBSCRIPTION_IDS with a trailing comma or
spaces is read as the ids it holds; the wiring deployment gets the alert's region.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SUB_A = "11111111-2222-4333-8444-555555555555"
SUB_B = "AAAAAAAA-bbbb-4ccc-8ddd-eeeeeeeeeeee"

# The stub: `az account show` exits with $STUB_SIGNED_IN (0 signed in, 1 not, as the real CLI does
# with "Please run 'az login' to setup account.") and prints $STUB_DEFAULT_SUB for `--query id`;
# `az functionapp function list` prints both function names; `az eventgrid system-topic list`
# prints $STUB_TOPICS (tsv rows), or $STUB_LIST_ERROR on stderr with exit 1, `show` prints
# the topic's $STUB_TOPIC_TYPE or $STUB_TOPIC_IDENTITY for the --query asked, or fails with exit 3
# (the CLI's code for a missing resource) when $STUB_TOPIC_TYPE is unset; everything is appended to
# $STUB_LOG.
STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
case "$1 $2" in
  "account show")
    if [ "$STUB_SIGNED_IN" = 0 ]; then
      case "$*" in *"--query id"*) echo "${STUB_DEFAULT_SUB:-}" ;; esac
      exit 0
    fi
    echo "ERROR: Please run 'az login' to setup account." >&2
    exit 1 ;;
  "functionapp function")
    printf 'vm_write_event\\nalert_webhook\\n'
    exit 0 ;;
  "eventgrid system-topic")
    case "$3" in
      list)
        if [ -n "${STUB_LIST_ERROR:-}" ]; then printf '%b' "$STUB_LIST_ERROR" >&2; exit 1; fi
        printf '%b' "${STUB_TOPICS:-}"; exit 0 ;;
      show)
        if [ -z "${STUB_TOPIC_TYPE:-}" ]; then echo "(ResourceNotFound)" >&2; exit 3; fi
        case "$*" in
          *"--query topicType"*) echo "$STUB_TOPIC_TYPE" ;;
          *"--query identity.type"*) echo "${STUB_TOPIC_IDENTITY:-}" ;;
        esac
        exit 0 ;;
    esac ;;
esac
exit 0
"""

DEPLOYED = {
    "AZURE_SUBSCRIPTION_ID": SUB_A,
    "AZURE_RESOURCE_GROUP": "rg-test",
    "AZURE_FUNCTION_APP_NAME": "func-x",
    "AZURE_SYSTEM_TOPIC_NAME": "evgt-x",
    "AZURE_LOG_ANALYTICS_WORKSPACE_NAME": "log-x",
    "AZURE_STORAGE_ACCOUNT_NAME": "stx",
    "AZURE_DEAD_LETTER_CONTAINER": "eventgrid-deadletter",
    "AZURE_LOCATION": "swedencentral",
}


def _run(
    tmp_path: Path, script: str, signed_in: bool, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "az"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "az.log"
    log.write_text("")
    full_env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_SIGNED_IN": "0" if signed_in else "1",
        **env,
    }
    result = subprocess.run(
        ["sh", str(SCRIPTS / script)], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )
    return result, log.read_text().splitlines()


@pytest.mark.parametrize("script", ["postdeploy.sh", "preprovision.sh"])
@pytest.mark.parametrize("env", [{}, DEPLOYED], ids=["nothing-set", "all-set"])
def test_not_signed_in_stops_first_in_one_line(tmp_path: Path, script: str, env: dict[str, str]) -> None:
    result, calls = _run(tmp_path, script, signed_in=False, env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "az login" in result.stderr, result.stderr
    assert "not signed in" in result.stderr
    assert calls == ["account show --output none"]  # nothing else was tried


def test_no_az_at_all_stops_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/nonexistent", **DEPLOYED}
    result = subprocess.run(
        ["/bin/sh", str(SCRIPTS / "postdeploy.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "az" in result.stderr


def test_postdeploy_signed_in_deploys_the_wiring_with_its_region(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, "postdeploy.sh", signed_in=True, env=DEPLOYED)
    assert result.returncode == 0, result.stderr
    assert calls[0] == "account show --output none"
    (wiring,) = [c for c in calls if c.startswith("deployment group create")]
    assert "location=swedencentral" in wiring and "workspaceName=log-x" in wiring
    assert not any(c.startswith("deployment mg create") for c in calls)  # no management group set


def test_postdeploy_wires_the_topic_in_its_own_resource_group(tmp_path: Path) -> None:
    env = {
        **DEPLOYED,
        "AZURE_SYSTEM_TOPIC_NAME": "evgt-shared",
        "AZURE_SYSTEM_TOPIC_RESOURCE_GROUP": "rg-events",
    }
    result, calls = _run(tmp_path, "postdeploy.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr
    (wiring,) = [c for c in calls if c.startswith("deployment group create")]
    assert "systemTopicName=evgt-shared systemTopicResourceGroup=rg-events" in wiring
    assert "--resource-group rg-test " in wiring  # the wiring itself stays in the app's group


def test_postdeploy_of_an_older_environment_finds_the_topic_in_the_app_s_group(tmp_path: Path) -> None:
    """An environment provisioned before AZURE_SYSTEM_TOPIC_RESOURCE_GROUP existed: `azd deploy`
    alone must still wire up its own topic."""
    result, calls = _run(tmp_path, "postdeploy.sh", signed_in=True, env=DEPLOYED)
    assert result.returncode == 0, result.stderr
    (wiring,) = [c for c in calls if c.startswith("deployment group create")]
    assert "systemTopicResourceGroup=rg-test" in wiring


TOPIC_ROWS = "evgt-mine\trg-avma\tMicrosoft.Resources.Subscriptions\nstoragetopic\trg-data\tMicrosoft.Storage.StorageAccounts\n"


@pytest.mark.parametrize(
    "topics",
    [
        "",
        TOPIC_ROWS,  # this environment's own topic (rg-avma) and one of another kind
        "evgt-mine\tRG-AVMA\tmicrosoft.resources.subscriptions\n",  # the CLI's casing varies
    ],
    ids=["none", "own-and-other-kind", "own-other-casing"],
)
def test_preprovision_goes_on_without_a_foreign_topic(tmp_path: Path, topics: str) -> None:
    env = {"AZURE_ENV_NAME": "avma", "AZURE_SUBSCRIPTION_ID": SUB_A, "STUB_TOPICS": topics}
    result, calls = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (
        f"eventgrid system-topic list --subscription {SUB_A} --query [].[name, resourceGroup, topicType] --output tsv"
        in calls
    )


def test_preprovision_checks_azd_s_subscription_and_says_so(tmp_path: Path) -> None:
    env = {"AZURE_ENV_NAME": "avma", "AZURE_SUBSCRIPTION_ID": SUB_A, "STUB_DEFAULT_SUB": SUB_B}
    result, calls = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr
    (listed,) = [c for c in calls if c.startswith("eventgrid system-topic list")]
    assert f"--subscription {SUB_A} " in listed  # azd's, not az's default
    assert f"checked subscription {SUB_A} (AZURE_SUBSCRIPTION_ID)" in result.stdout


def test_preprovision_of_a_fresh_environment_checks_az_s_default_subscription_by_id_and_says_so(
    tmp_path: Path,
) -> None:
    """azd sets AZURE_SUBSCRIPTION_ID "right before an environment is provisioned for the first
    time" (MicrosoftDocs/azure-dev-docs manage-environment-variables.md): a fresh environment's hook
    may run without it. The check then names the subscription it read, and how to point it at azd's."""
    env = {"AZURE_ENV_NAME": "avma", "STUB_DEFAULT_SUB": SUB_B}
    result, calls = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr
    (listed,) = [c for c in calls if c.startswith("eventgrid system-topic list")]
    assert f"--subscription {SUB_B} " in listed
    assert (
        f"checked subscription {SUB_B} (az's default: AZURE_SUBSCRIPTION_ID is not set yet" in result.stdout
    )
    assert "azd env set AZURE_SUBSCRIPTION_ID" in result.stdout


# What az prints for an ARM error: azure-core's "(Code) Message", then Code: and Message: lines.
# The texts: AuthorizationFailed as ARM words it; MissingSubscriptionRegistration as in
# Azure/data-product-streaming#12 and OfficeDev/microsoft-teams-apps-company-communicator#1530.
DENIED = (
    "ERROR: (AuthorizationFailed) The client 'me@contoso.com' with object id '00000000-0000-0000-0000-000000000001'"
    " does not have authorization to perform action 'Microsoft.EventGrid/systemTopics/read' over scope"
    f" '/subscriptions/{SUB_A}' or the scope is invalid.\\nCode: AuthorizationFailed\\nMessage: The client ...\\n"
)
UNREGISTERED = (
    "ERROR: (MissingSubscriptionRegistration) The subscription is not registered to use namespace"
    " 'Microsoft.EventGrid'. See https://aka.ms/rps-not-found for how to register subscriptions.\\n"
    "Code: MissingSubscriptionRegistration\\n"
)


def test_preprovision_stops_in_one_line_when_the_topics_cannot_be_listed(tmp_path: Path) -> None:
    """The check used to pass silently when the list failed (`|| true`), whatever the reason."""
    env = {"AZURE_ENV_NAME": "avma", "AZURE_SUBSCRIPTION_ID": SUB_A, "STUB_LIST_ERROR": DENIED}
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"preprovision: cannot list the Event Grid system topics of subscription {SUB_A} (AZURE_SUBSCRIPTION_ID): "
        "ERROR: (AuthorizationFailed)"
    ), result.stderr


def test_preprovision_goes_on_when_event_grid_is_not_registered_in_the_subscription(tmp_path: Path) -> None:
    """No provider registered, no topic: the deployment registers it and creates the topic."""
    env = {"AZURE_ENV_NAME": "avma", "AZURE_SUBSCRIPTION_ID": SUB_A, "STUB_LIST_ERROR": UNREGISTERED}
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr


def test_pwsh_preprovision_checks_the_same_subscription_and_stops_on_a_failed_list() -> None:
    """No pwsh here: the twin is read for the same subscription choice and the same failure line."""
    text = (SCRIPTS / "preprovision.ps1").read_text()
    sh = (SCRIPTS / "preprovision.sh").read_text()
    for needed in (
        "az account show --query id --output tsv",
        "(AZURE_SUBSCRIPTION_ID)",
        "(az's default: AZURE_SUBSCRIPTION_ID is not set yet; if azd deploys to another one, azd env set AZURE_SUBSCRIPTION_ID <id> and run again)",
        "MissingSubscriptionRegistration|not registered",
        "preprovision: cannot list the Event Grid system topics of ",
        "checked $checked; extra target subscriptions",
    ):
        assert needed in text, needed
        assert needed in sh, needed
    assert "2>$null\n    if ($LASTEXITCODE -ne 0) { $rows = @() }" not in text  # errors no longer dropped
    assert "$listExit -ne 0" in text and "exit 1" in text[text.index("$listExit -ne 0") :]


def test_preprovision_stops_on_a_topic_the_subscription_already_has_and_says_what_to_set(
    tmp_path: Path,
) -> None:
    topics = TOPIC_ROWS + "evgt-corp\trg-events\tMicrosoft.Resources.Subscriptions\n"
    env = {"AZURE_ENV_NAME": "avma", "STUB_TOPICS": topics}
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        "azd env set EXISTING_SYSTEM_TOPIC_NAME evgt-corp && azd env set EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP rg-events"
        in result.stderr
    )


EXISTING = {"EXISTING_SYSTEM_TOPIC_NAME": "evgt-corp", "EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP": "rg-events"}


@pytest.mark.parametrize("identity", ["SystemAssigned", "SystemAssigned, UserAssigned"])
def test_preprovision_accepts_a_named_topic_with_a_system_identity(tmp_path: Path, identity: str) -> None:
    env = {
        **EXISTING,
        "STUB_TOPIC_TYPE": "Microsoft.Resources.Subscriptions",
        "STUB_TOPIC_IDENTITY": identity,
    }
    result, calls = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "existing Event Grid system topic evgt-corp (rg-events)" in result.stdout
    assert not any(c.startswith("eventgrid system-topic list") for c in calls)  # no search when named


@pytest.mark.parametrize(
    ("env", "needed"),
    [
        ({"EXISTING_SYSTEM_TOPIC_NAME": "evgt-corp"}, "set both"),
        ({"EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP": "rg-events"}, "set both"),
        (EXISTING, "no Event Grid system topic 'evgt-corp' in resource group 'rg-events'"),
        (
            {**EXISTING, "STUB_TOPIC_TYPE": "Microsoft.Storage.StorageAccounts"},
            "not Microsoft.Resources.Subscriptions",
        ),
        (
            {**EXISTING, "STUB_TOPIC_TYPE": "Microsoft.Resources.Subscriptions", "STUB_TOPIC_IDENTITY": ""},
            "az eventgrid system-topic update --name evgt-corp --resource-group rg-events --mi-system-assigned",
        ),
        (
            {
                **EXISTING,
                "STUB_TOPIC_TYPE": "Microsoft.Resources.Subscriptions",
                "STUB_TOPIC_IDENTITY": "UserAssigned",
            },
            "no system-assigned identity",
        ),
    ],
    ids=["name-only", "group-only", "missing", "other-kind", "no-identity", "user-assigned-only"],
)
def test_preprovision_rejects_a_named_topic_it_cannot_use(
    tmp_path: Path, env: dict[str, str], needed: str
) -> None:
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and needed in result.stderr, result.stderr


def test_pwsh_preprovision_checks_the_topic_like_the_sh_one() -> None:
    """No pwsh here: the twin is read for the same checks and the same advice."""
    text = (SCRIPTS / "preprovision.ps1").read_text()
    sh = (SCRIPTS / "preprovision.sh").read_text()
    for needed in (
        "EXISTING_SYSTEM_TOPIC_NAME",
        "EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP",
        "az eventgrid system-topic show",
        "--query topicType",
        "--query identity.type",
        "az eventgrid system-topic list",
        "[].[name, resourceGroup, topicType]",
        "systemassigned",
        "microsoft.resources.subscriptions",
        "rg-$",
        "azd env set EXISTING_SYSTEM_TOPIC_NAME $name && azd env set EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP $group",
    ):
        assert needed in text, needed
        assert needed.replace("rg-$", "rg-${") in sh, needed


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("", "none"),
        (f"{SUB_A},", SUB_A),  # a trailing comma
        (f" {SUB_A} , , {SUB_B} ,", f"{SUB_A},{SUB_B}"),  # spaces and an empty entry
        (",", "none"),
    ],
)
def test_preprovision_reads_target_subscriptions_without_empty_entries(
    tmp_path: Path, given: str, shown: str
) -> None:
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env={"TARGET_SUBSCRIPTION_IDS": given})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"extra target subscriptions: {shown}.")


@pytest.mark.parametrize("bad", ["not-a-guid", f"{SUB_A};{SUB_B}", f"{SUB_A},{SUB_A[:-1]}"])
def test_preprovision_rejects_an_entry_that_is_not_a_subscription_id(tmp_path: Path, bad: str) -> None:
    result, _ = _run(tmp_path, "preprovision.sh", signed_in=True, env={"TARGET_SUBSCRIPTION_IDS": bad})
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "TARGET_SUBSCRIPTION_IDS" in result.stderr


def _errors(node: Node) -> list[str]:
    found = [f"{node.type} at {node.start_point}"] if node.type == "ERROR" or node.is_missing else []
    for child in node.children:
        found += _errors(child)
    return found


@pytest.mark.parametrize("script", ["postdeploy.ps1", "preprovision.ps1"])
def test_pwsh_hooks_check_az_first_and_exit_non_zero(script: str) -> None:
    """No pwsh here (tooling notes §3): the PowerShell twins are parsed and read."""
    source = (SCRIPTS / script).read_bytes()
    assert _errors(Parser(Language(tree_sitter_powershell.language())).parse(source).root_node) == []
    text = source.decode()
    body = text[text.index("$ErrorActionPreference = 'Stop'") :]
    first_az = body.index("az account show --output none")
    before = body[:first_az]
    assert "Get-Required" not in before and "GetEnvironmentVariable" not in before
    assert re.findall(r"^\s*az ", before, re.M) == []
    check = body[first_az : body.index("}", first_az) + 1]
    assert "$LASTEXITCODE -ne 0" in check and "exit 1" in check and "az login" in check


def test_pwsh_preprovision_drops_empty_entries_and_checks_the_rest() -> None:
    text = (SCRIPTS / "preprovision.ps1").read_text()
    assert ".Split(',')" in text and ".Trim()" in text and "if ($id -eq '') { continue }" in text
    sh_guid = re.search(r"guid='(.+)'", (SCRIPTS / "preprovision.sh").read_text())
    ps_guid = re.search(r"\$guid = '(.+)'", text)
    assert sh_guid and ps_guid and sh_guid.group(1) == ps_guid.group(1)


def test_azure_yaml_runs_both_hooks() -> None:
    text = (ROOT / "azure.yaml").read_text()
    for line in (
        "  preprovision:",
        "      run: ./scripts/preprovision.sh",
        "      run: ./scripts/preprovision.ps1",
        "      run: ./scripts/postdeploy.sh",
    ):
        assert line in text.splitlines()
    assert os.access(SCRIPTS / "preprovision.sh", os.X_OK) and os.access(SCRIPTS / "postdeploy.sh", os.X_OK)
