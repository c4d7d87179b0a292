#!/bin/sh
# azd preprovision hook (azure.yaml): fails in one line, before anything is deployed, on what would
# otherwise stop `azd up` later:
#
#   1. the Azure CLI must be signed in: the postdeploy hook runs `az` after provisioning;
#   2. TARGET_SUBSCRIPTION_IDS (optional, comma-separated) must hold subscription ids only. Empty
#      entries (a trailing comma, ' , ') are dropped, as infra/main.bicep drops them.
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

echo "preprovision: az is signed in; extra target subscriptions: ${targets:-none}."
