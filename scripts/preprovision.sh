#!/bin/sh
# azd preprovision hook (azure.yaml): fails in one line, before anything is deployed, on what would
# otherwise stop `azd up` later:
#
#   1. the Azure CLI must be signed in: the postdeploy hook runs `az` after provisioning;
#   2. TARGET_SUBSCRIPTION_IDS (optional, comma-separated) must hold subscription ids only. Empty
#      entries (a trailing comma, ' , ') are dropped, as infra/main.bicep drops them;
#   3. the Event Grid system topic of the subscription's resource events: a subscription can have
#      only one, so when it already has one that is not this environment's own (in rg-<env>), the
#      deployment must use it (EXISTING_SYSTEM_TOPIC_NAME and EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP)
#      instead of creating a second, which fails at `events`; a named topic must exist, be of
#      that topic type, and have a system-assigned identity, which dead-letters undeliverable events
#      into the app's storage account (it takes no shared key).
#
# Prints the subscriptions the VM role will be granted at besides the deployment's own.
set -eu

if ! command -v az >/dev/null 2>&1; then
  echo "preprovision: the Azure CLI (az) is not installed or not on PATH; install it and run az login (the postdeploy hook needs it)." >&2
  exit 1
fi
if ! az account show --output none >/dev/null 2>&1; then
  echo "preprovision: the Azure CLI is not signed in; run az login (same tenant as azd) before azd up." >&2
  exit 1
fi

guid='^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$'
targets=""
set -f
old_ifs=$IFS
IFS=','
for entry in ${TARGET_SUBSCRIPTION_IDS:-}; do
  entry=$(printf '%s' "$entry" | tr -d ' \t\r\n')
  [ -n "$entry" ] || continue
  if ! printf '%s\n' "$entry" | grep -Eq "$guid"; then
    echo "preprovision: TARGET_SUBSCRIPTION_IDS entry '$entry' is not a subscription id; fix it with azd env set TARGET_SUBSCRIPTION_IDS <id>,<id>." >&2
    exit 1
  fi
  targets="${targets:+$targets,}$entry"
done
IFS=$old_ifs
set +f

topic_type='microsoft.resources.subscriptions'
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
# The subscription checked: azd's (AZURE_SUBSCRIPTION_ID), which azd sets "right before an
# environment is provisioned for the first time" (azd's environment-variable docs), so a fresh
# environment's first hook may run before it is set: then az's default, said so in the output.
if [ -n "${AZURE_SUBSCRIPTION_ID:-}" ]; then
  subscription=$AZURE_SUBSCRIPTION_ID
  checked="subscription $subscription (AZURE_SUBSCRIPTION_ID)"
else
  subscription=$(az account show --query id --output tsv 2>/dev/null | tr -d '\r\n' || true)
  checked="subscription ${subscription:-unknown} (az's default: AZURE_SUBSCRIPTION_ID is not set yet; if azd deploys to another one, azd env set AZURE_SUBSCRIPTION_ID <id> and run again)"
fi
if [ -n "$subscription" ]; then set -- --subscription "$subscription"; else set --; fi
topic_name=${EXISTING_SYSTEM_TOPIC_NAME:-}
topic_group=${EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP:-}
if [ -n "$topic_name" ] || [ -n "$topic_group" ]; then
  if [ -z "$topic_name" ] || [ -z "$topic_group" ]; then
    echo "preprovision: set both EXISTING_SYSTEM_TOPIC_NAME and EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP (azd env set), or neither." >&2
    exit 1
  fi
  if ! found_type=$(az eventgrid system-topic show "$@" --name "$topic_name" --resource-group "$topic_group" \
    --query topicType --output tsv 2>/dev/null); then
    echo "preprovision: no Event Grid system topic '$topic_name' in resource group '$topic_group'; list them with az eventgrid system-topic list --query \"[?topicType=='Microsoft.Resources.Subscriptions']\"." >&2
    exit 1
  fi
  if [ "$(lower "$found_type")" != "$topic_type" ]; then
    echo "preprovision: the system topic '$topic_name' is of type '$found_type', not Microsoft.Resources.Subscriptions (the subscription's resource events); set EXISTING_SYSTEM_TOPIC_NAME to that one." >&2
    exit 1
  fi
  identity=$(az eventgrid system-topic show "$@" --name "$topic_name" --resource-group "$topic_group" \
    --query identity.type --output tsv 2>/dev/null || true)
  case "$(lower "$identity")" in
    *systemassigned*) ;;
    *)
      echo "preprovision: the system topic '$topic_name' has no system-assigned identity, which dead-letters into the app's storage; add one (az eventgrid system-topic update --name $topic_name --resource-group $topic_group --mi-system-assigned, or beside its user-assigned ones: see the README, Deploy)." >&2
      exit 1
      ;;
  esac
  echo "preprovision: the existing Event Grid system topic $topic_name ($topic_group) gets the event subscription."
else
  # name, resource group and topic type of each system topic; this environment's own is in rg-<env>.
  # A subscription whose Microsoft.EventGrid provider is not registered has no topic (the list fails
  # with MissingSubscriptionRegistration); any other failure (no right to read, a network error)
  # would leave the check unmade, so it stops here, in one line.
  errors=$(mktemp)
  if ! topics=$(az eventgrid system-topic list "$@" --query "[].[name, resourceGroup, topicType]" --output tsv 2>"$errors"); then
    if grep -Eqi 'MissingSubscriptionRegistration|not registered' "$errors"; then
      topics=""
    else
      said=$(grep -v '^[[:space:]]*$' "$errors" | head -n 1 | tr -d '\r' | cut -c 1-300)
      rm -f "$errors"
      echo "preprovision: cannot list the Event Grid system topics of $checked: ${said:-az failed with no message}" >&2
      exit 1
    fi
  fi
  rm -f "$errors"
  other=$(printf '%s\n' "$topics" | awk -F '\t' -v own="$(lower "rg-${AZURE_ENV_NAME:-}")" -v kind="$topic_type" \
    'NF >= 3 && tolower($3) == kind && tolower($2) != own { print $1 " " $2; exit }')
  if [ -n "$other" ]; then
    name=${other% *}
    group=${other#* }
    echo "preprovision: this subscription already has the Event Grid system topic $name (resource group $group) for its resource events, and can have only one; use it: azd env set EXISTING_SYSTEM_TOPIC_NAME $name && azd env set EXISTING_SYSTEM_TOPIC_RESOURCE_GROUP $group" >&2
    exit 1
  fi
fi

echo "preprovision: az is signed in; checked $checked; extra target subscriptions: ${targets:-none}."
