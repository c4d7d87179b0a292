"""Operator hints: what an outcome reason means for the person who has to act on it.

The same text goes to the CLI, the ledger and the logs; docs/troubleshooting.md explains each
reason at length.
"""

from __future__ import annotations

from shared.guest.facts import Channel, GuestResult
from shared.settings import Settings

# Reasons of a remediation that stopped or did not verify; their hint depends on what happened.
_UNFINISHED = ("step-error:", "remediation-error:", "verify-failed", "activation-not-attempted")


def hint_for(reason: str, settings: Settings) -> str:
    """A one-paragraph hint for a reason word, or "" when nothing needs doing."""
    cloud = settings.cloud
    code = reason.rsplit(":", 1)[-1].upper() if ":" in reason else ""
    if reason.startswith("activation-error:"):
        if code == "0XC004F074":
            return (
                f"No KMS could be contacted. The VM must reach {settings.kms_target} from an Azure "
                f"public IP. With forced tunnelling, an NVA or a firewall, add routes for "
                f"{', '.join(f'{ip}/32' for ip in cloud.kms_ips)} with next hop Internet and allow "
                f"TCP {settings.kms_port} outbound; a VM behind a Standard internal load balancer "
                "needs outbound connectivity. The KMS key is installed: once the route works, "
                "Windows activates on its own (or run the check again)."
            )
        if code == "0XC004F06C":
            return "The KMS rejected the request because of clock skew: fix the VM's time sync, then re-run."
        if code in ("0XC004FD02", "0XC004FD01"):
            return "Windows still tries AVMA: the key change did not take; re-run detection, check the key."
        return "Activation failed; see docs/troubleshooting.md and the SPP events (IDs 8198, 12288)."
    if reason.startswith("attestation-imds-http:"):
        return _imds_http_hint(reason.split(":", 1)[1])
    if reason.startswith("key-install-error:"):
        return (
            "Windows refused the KMS client setup key: the VM's edition does not match the catalog "
            "entry (0xC004F069) or the key is invalid (0xC004F050). Nothing else was changed."
        )
    if reason.startswith(_UNFINISHED):
        return "The remediation did not complete. Re-run check on it: it detects the state first."
    route = (
        f"The VM must reach {settings.kms_target} from an Azure public IP: with forced tunnelling, an "
        f"NVA or a firewall, add routes for {', '.join(f'{ip}/32' for ip in cloud.kms_ips)} with next "
        f"hop Internet and allow TCP {settings.kms_port} outbound."
    )
    hints = {
        "kms-unreachable": (
            "The VM is still activated through AVMA but cannot reach the KMS. Installing the KMS client "
            "key now would drop that activation at once, so the re-key waits (it is retried) until the "
            f"route works. {route}"
        ),
        "avma-licensed-kms-unreachable": (
            "Still activated through AVMA, and the KMS is unreachable: --apply would not re-key it yet "
            f"(deferred: kms-unreachable) but wait for the route. {route}"
        ),
        "avma-kms-unreachable": (
            "Not activated, and the KMS is unreachable: --apply would install the KMS client key, and "
            "activation would fail with 0xC004F074 until the route works; then Windows activates on its "
            f"own. {route}"
        ),
        "powershell-version": (
            "The VM runs Windows PowerShell older than 3.0 (e.g. Windows Server 2008 R2 as shipped), "
            "which the scripts cannot use; nothing was changed. Install WMF 5.1 (Windows Management "
            "Framework 5.1) or upgrade Windows; Run Command does not officially support that Windows "
            "version, so this is best effort only."
        ),
        "attestation-imds-unreachable": (
            "Datacenter: Azure Edition is KMS-activated but cannot reach IMDS (169.254.169.254), which it "
            "needs for its activation token, so Windows keeps the activation watermark. Let HTTP clients "
            "bypass web proxies for 169.254.169.254 (treat it as 168.63.129.16), and check with `route "
            "print` that it goes through the primary network interface, whose MAC and IP must match what "
            "Azure shows. Then re-run check. Source: Microsoft's 'Windows activation watermark continues "
            "to be displayed'."
        ),
        "attestation-chain-invalid": (
            "Datacenter: Azure Edition is KMS-activated and reaches IMDS, but the attested document's "
            "certificate chain cannot be built (missing or expired intermediate certificates, e.g. "
            "Microsoft Azure RSA TLS Issuing CA), so Windows keeps the activation watermark. On Server "
            "2022 install "
            "KB5036909 or a later cumulative update; let firewalls and proxies allow the certificate "
            "downloads, or install the Azure CA chain in the Local Machine store; then run fclip.exe "
            "(C:\\Windows\\System32) as administrator and sign out and in or restart. Then re-run check."
        ),
        "attestation-not-reported": (
            "Datacenter: Azure Edition, but the guest script did not report the IMDS attestation check, "
            "so whether Windows shows the activation watermark is unknown; never counted as healthy. "
            "Re-run check; if it persists, the guest script is older than the contract (file an issue)."
        ),
        "channel-mismatch": (
            "The licensing Description and the Product Key Channel name different channels (compare "
            "description and productKeyChannel, or `slmgr /dlv`), so which key is installed is "
            "unclear; never touched. Look at the VM by hand; if the values look right, file an issue."
        ),
        "avma-before-2012r2": (
            "The VM reports the AVMA channel on a Windows older than Server 2012 R2, where AVMA does not "
            "exist: the facts contradict themselves, so it is never re-keyed. Look at it by hand "
            "(slmgr /dlv); a KMS client setup key from Microsoft's table can be installed by hand."
        ),
        "unknown-edition": (
            "AVMA key on an edition the catalog does not know; never guessed. Install the right "
            "KMS client setup key by hand or file an issue with the edition facts."
        ),
        "multi-session": (
            "Windows Enterprise multi-session is never re-keyed (it cannot be undone). It activates "
            "through the Azure KMS without a key change; check its route to the KMS."
        ),
        "custom-kms": (
            "Not licensed and pointed at a custom KMS host; left alone. Fix that KMS, or set "
            "ALLOW_CUSTOM_KMS_OVERRIDE=true to move such VMs to the Azure KMS."
        ),
        "agent-not-ready": "The VM agent is not Ready, so Run Command cannot work; it is retried later.",
        "vm-starting": "The VM is starting (PowerState/starting); Run Command needs it running; retried.",
        "power-state-unknown": (
            "ARM reports the VM's power state as unknown (PowerState/unknown), usually briefly; "
            "retried later. If it persists, check the VM's Resource Health."
        ),
        "run-command-busy": "Another Run Command is running on the VM; retried later.",
        "run-command-timeout": "The Run Command did not finish in time; state is re-read on retry.",
        "throttled": "ARM throttled the requests (HTTP 429); retried later with back-off.",
        "arm-unavailable": "ARM answered with a server error; retried later.",
        "detection-error": (
            "The detection script could not read the licensing facts, or could not write its result "
            "(error step write-result); nothing was changed. See the error field (step and HRESULT)."
        ),
        "bad-output": (
            "The guest output had no valid result line (truncated or garbled), so nothing is known "
            "about the VM yet; retried, and the retry detects the VM's state before anything else. "
            "See the details (phase, error, stderr)."
        ),
        "run-command-failed": (
            "The Run Command operation failed in Azure (or ARM refused it); see the code and error "
            "in the details. An operation that ended Failed is retried, detecting the VM's state first."
        ),
        "forbidden": "The identity lacks a permission (see the custom role in infra/).",
    }
    return hints.get(reason, "")


def unreadable_hint(reason: str, tries: int) -> str:
    """The hint once a Run Command answer said nothing about the VM ``tries`` times (terminal)."""
    what = (
        "the Run Command operation ended Failed in Azure"
        if reason == "run-command-failed"
        else "the guest output had no valid result line (truncated or garbled)"
    )
    return (
        f"{tries} tries, and each time {what}: no longer taken for a passing fault. Look at the VM's Run "
        "Command extension and agent (the code, error and stderr in the details; the last 4,096 bytes "
        "of output are all Run Command keeps), then run check again: it detects the state first."
    )


def _imds_http_hint(status: str) -> str:
    """IMDS (or whatever answers for 169.254.169.254) answered with an HTTP error status.

    What each status means: IMDS's "Errors and debugging" table (MicrosoftDocs/azure-compute-docs
    articles/virtual-machines/instance-metadata-service.md).
    """
    if status == "429":
        advice = (
            "IMDS allows 5 requests per second and something on the VM is over that limit: re-run "
            "check later, and look for agents polling 169.254.169.254."
        )
    elif status in ("410", "500", "502", "503", "504"):
        advice = "IMDS asks to retry after some time (410: for up to 70 seconds): re-run check later."
    elif status in ("403", "407"):
        advice = (
            "Something on the path answered in IMDS's place (a transparent proxy or filter): let "
            "169.254.169.254 bypass it, then re-run check."
        )
    else:
        advice = (
            "IMDS refused the request (400: the Metadata header did not arrive; 404: the element does "
            "not exist); re-run check, and if it persists file an issue with the error text."
        )
    return (
        f"Datacenter: Azure Edition is KMS-activated, but IMDS answered HTTP {status} to the attested "
        "document request (http://169.254.169.254/metadata/attested/document), so Windows keeps the "
        "activation watermark. The address was reached, so this is not a proxy or route problem. "
        f"{advice}"
    )


def remediation_hint(reason: str, settings: Settings, before: GuestResult, after: GuestResult) -> str:
    """The hint after a remediation, told from its steps and the facts the script re-read.

    A partial remediation may already have changed the channel (the key installed, a later step or
    the verification failed): the hint must say so rather than claim the VM kept its channel.
    """
    if not reason.startswith(_UNFINISHED):
        return hint_for(reason, settings)
    state = state_after(before, after)
    return f"The remediation did not complete. {state} Re-run check on it: it detects first."


def state_after(before: GuestResult, after: GuestResult) -> str:
    """One sentence on the VM's licensing state after a remediation attempt."""
    was = before.license.channel.value if before.license is not None else "unknown"
    key_installed = any(step.name == "install-key" and step.ok for step in after.steps)
    lic = after.license
    if lic is None:
        if key_installed:
            return "The KMS client key was installed, but the state after it could not be read."
        return "What the script changed is not known: it could not report the state after its steps."
    now = lic.channel
    status = int(lic.license_status)
    if now is Channel.KMS_CLIENT and was != Channel.KMS_CLIENT.value:
        return (
            f"The KMS client key is installed: the VM is now a KMS client (it was {was}), license status "
            f"{status}, so it no longer uses its previous channel. A re-run repairs it as a KMS client "
            "(sets the Azure KMS and activates)."
        )
    if now.value == was:
        return f"The VM keeps its previous channel ({was}, license status {status})."
    return f"The VM is now on the {now.value} channel (it was {was}), license status {status}."


# A deferral's hint in the app says "retried later": the worker re-enqueues it with a growing delay
# until DEFER_DEADLINE_HOURS. A CLI run has no queue: it retries some reasons itself, within the run
# (shared/inrun_retry.py), and what is still deferred at its end must say to run again later
# (issue 10, item 6). Per reason: what happened, and what to wait for before running again.
_RERUN: dict[str, tuple[str, str]] = {
    "run-command-busy": ("Another Run Command is running on the VM", "run again later"),
    "throttled": ("ARM throttled the requests (HTTP 429)", "run again later"),
    "arm-unavailable": ("ARM answered with a server error", "run again later"),
    "lease-held": (
        "Another workflow holds this VM's lease in the ledger (the app's worker, or another CLI run), "
        "so nothing was done to it",
        "run again later, or see it in /api/status",
    ),
    "lease-lost": (
        "This run's lease on the VM expired and was taken over before a Run Command, so nothing was sent",
        "run again later",
    ),
    "ledger-unavailable": (
        "The ledger (Table storage) could not be reached to take the VM's lease, so nothing was done",
        "run again later",
    ),
    "run-command-failed": ("The Run Command operation failed in Azure", "run again later"),
    "bad-output": ("The guest output had no valid result line (truncated or garbled)", "run again later"),
    "agent-not-ready": (
        "The VM agent is not Ready, so Run Command cannot work",
        "run again later, once the VM shows its agent Ready",
    ),
    "vm-starting": (
        "The VM is starting (PowerState/starting); Run Command needs it running",
        "run again in a few minutes",
    ),
    "power-state-unknown": (
        "ARM reports the VM's power state as unknown (PowerState/unknown), usually briefly",
        "run again later; if it persists, check the VM's Resource Health",
    ),
    "run-command-timeout": (
        "The Run Command did not finish in time (it may still be running in the VM)",
        "run again later: the next run detects the VM's state before anything else",
    ),
    "arm-timeout": ("ARM did not answer within ARM_CALL_TIMEOUT_SECONDS", "run again later"),
}


def rerun_hint(reason: str, settings: Settings, *, tries: int = 1) -> str:
    """The hint of a VM a CLI run leaves deferred: what happened, then "run again later".

    ``tries`` is how many times this run checked the VM (more than one: it retried within the run).
    """
    retried = f"; still so after {tries} tries in this run" if tries > 1 else ""
    if reason == "kms-unreachable":
        cloud = settings.cloud
        return (
            "Still activated through AVMA, but the KMS is unreachable: the key is not changed, since "
            "that would drop its activation at once. The VM must reach "
            f"{settings.kms_target} from an Azure public IP: add routes for "
            f"{', '.join(f'{ip}/32' for ip in cloud.kms_ips)} with next hop Internet and allow TCP "
            f"{settings.kms_port} outbound; once the route works, run again."
        )
    cause, then = _RERUN.get(reason, (f"Not finished in this run ({reason})", "run again later"))
    return f"{cause}{retried}: {then}."
