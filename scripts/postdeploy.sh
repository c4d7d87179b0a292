#!/bin/sh
# azd postdeploy hook (azure.yaml): wires up what needs the deployed function code.
#
#   1. waits until the Functions host lists vm_write_event and alert_webhook (Flex Consumption
#      indexes the functions a little after `azd deploy` returns);
#   2. deploys infra/post/wiring.bicep: the Event Grid subscription (VM writes -> vm_write_event,
#      retries, dead-lettering; in the topic's resource group), the action group (alert_webhook, common alert schema) and the
#      log search alert for 0xC004FD02;
#   3. when AZURE_MANAGEMENT_GROUP_ID is set, deploys infra/management-group.bicep: the custom VM
#      role and its assignment at that management group.
#
# Idempotent: every deployment and resource name is fixed, so running it again changes nothing.
# Needs the Azure CLI signed in to the same tenant (az login): checked first, in one line. azd passes its environment values
# (the outputs of infra/main.bicep) as environment variables; by hand, export them first:
#   eval "$(azd env get-values)" && sh scripts/postdeploy.sh
set -eu

# First, before anything else: every step below is an `az` call.
if ! command -v az >/dev/null 2>&1; then
  echo "postdeploy: the Azure CLI (az) is not installed or not on PATH; install it, run az login, then azd deploy again." >&2
  exit 1
fi
if ! az account show --output none >/dev/null 2>&1; then
  echo "postdeploy: the Azure CLI is not signed in; run az login (same tenant as azd), then azd deploy again." >&2
  exit 1
fi

: "${AZURE_SUBSCRIPTION_ID:?not set: run through azd, or eval \"\$(azd env get-values)\" first}"
: "${AZURE_RESOURCE_GROUP:?not set: run azd provision first}"
: "${AZURE_FUNCTION_APP_NAME:?not set: run azd provision first}"
: "${AZURE_SYSTEM_TOPIC_NAME:?not set: run azd provision first}"
: "${AZURE_LOG_ANALYTICS_WORKSPACE_NAME:?not set: run azd provision first}"
: "${AZURE_STORAGE_ACCOUNT_NAME:?not set: run azd provision first}"
: "${AZURE_DEAD_LETTER_CONTAINER:?not set: run azd provision first}"
: "${AZURE_LOCATION:?not set: run azd provision first}"

# The topic's resource group: another one when the subscription already had a topic; an
# environment provisioned before that output existed has its topic in its own resource group.
topic_group=${AZURE_SYSTEM_TOPIC_RESOURCE_GROUP:-$AZURE_RESOURCE_GROUP}

here=$(cd "$(dirname "$0")" && pwd)
infra="$here/../infra"

echo "Waiting for the functions of $AZURE_FUNCTION_APP_NAME to be indexed..."
attempt=0
while :; do
  names=$(az functionapp function list \
    --subscription "$AZURE_SUBSCRIPTION_ID" \
    --resource-group "$AZURE_RESOURCE_GROUP" \
    --name "$AZURE_FUNCTION_APP_NAME" \
    --query "[].name" --output tsv 2>/dev/null || true)
  case "$names" in
    *vm_write_event*)
      case "$names" in
        *alert_webhook*) break ;;
      esac
      ;;
  esac
  attempt=$((attempt + 1))
  if [ "$attempt" -ge 30 ]; then
    echo "The functions vm_write_event and alert_webhook did not appear within 5 minutes; run azd deploy again." >&2
    exit 1
  fi
  sleep 10
done

echo "Deploying the Event Grid subscription, the action group and the log search alert..."
az deployment group create \
  --subscription "$AZURE_SUBSCRIPTION_ID" \
  --resource-group "$AZURE_RESOURCE_GROUP" \
  --name avma-remediator-wiring \
  --template-file "$infra/post/wiring.bicep" \
  --parameters \
    functionAppName="$AZURE_FUNCTION_APP_NAME" \
    systemTopicName="$AZURE_SYSTEM_TOPIC_NAME" \
    systemTopicResourceGroup="$topic_group" \
    workspaceName="$AZURE_LOG_ANALYTICS_WORKSPACE_NAME" \
    location="$AZURE_LOCATION" \
    storageAccountName="$AZURE_STORAGE_ACCOUNT_NAME" \
    deadLetterContainerName="$AZURE_DEAD_LETTER_CONTAINER" \
  --output none

if [ -n "${AZURE_MANAGEMENT_GROUP_ID:-}" ]; then
  : "${AZURE_IDENTITY_PRINCIPAL_ID:?not set: run azd provision first}"
  : "${AZURE_ENV_NAME:?not set: run through azd}"
  echo "Granting the VM role at management group $AZURE_MANAGEMENT_GROUP_ID..."
  az deployment mg create \
    --management-group-id "$AZURE_MANAGEMENT_GROUP_ID" \
    --location "$AZURE_LOCATION" \
    --name "avma-remediator-vm-access-$AZURE_ENV_NAME" \
    --template-file "$infra/management-group.bicep" \
    --parameters \
      principalId="$AZURE_IDENTITY_PRINCIPAL_ID" \
      environmentName="$AZURE_ENV_NAME" \
    --output none
fi

echo "avma-remediator is wired up (mode: ${REMEDIATION_MODE:-audit})."
