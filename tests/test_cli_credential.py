"""The credential is checked once, before any VM (issue 10, item 2): no token, one line, exit 2.

Run as a subprocess, as a user runs it: azure-identity reads the process environment, and the
exit code and stderr are the process's. The simulator serves ARM, so "before any VM" is checked
on its own request log: not one ARM request is made.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli import _simulated_env
from simulator import Estate, Simulator

ROOT = Path(__file__).resolve().parent.parent
VM = next(v["id"] for v in Estate.default().to_dict()["vms"] if v["os"] == "Windows")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(Estate.default(), latency_s=0.01) as simulator:
        yield simulator


def test_a_broken_identity_endpoint_is_one_line_and_exit_2_before_any_vm(
    sim: Simulator, tmp_path: Path
) -> None:
    """The managed identity endpoint refuses the request (a wrong IDENTITY_HEADER: 401): today every
    VM would end ``failed: run-command-failed`` with azure-identity's text, and the run exit 1."""
    env = {k: v for k, v in _simulated_env(sim.env()).items() if v is not None}
    env.update(PATH="/nonexistent", HOME=str(tmp_path), IDENTITY_HEADER="not-the-secret")
    before = len(sim.request_log())
    done = _cli(["check", VM, "--output", "json"], env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "avma-remediator: no Azure credential: the managed identity endpoint (IDENTITY_ENDPOINT) gave no token"
    )
    assert "X-IDENTITY-HEADER mismatch" in lines[0]  # what the endpoint said, not cut
    assert len(sim.request_log()) == before  # no ARM request at all


class _NoIdentityImds(http.server.BaseHTTPRequestHandler):
    """IMDS on a machine with no identity assigned: 400 ``Identity not found`` (the managed identity
    token endpoint's documented error), which azure-identity reads as "no identity" at once."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "invalid_request", "error_description": "Identity not found"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def imds_without_identity() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoIdentityImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_no_credential_at_all_says_run_az_login_and_what_was_tried(
    sim: Simulator, tmp_path: Path, imds_without_identity: str
) -> None:
    """An admin's machine with nothing signed in: no az, no environment credential, no identity.

    AZURE_POD_IDENTITY_AUTHORITY_HOST points azure-identity's IMDS request at a stand-in that answers
    as IMDS does without an identity, so the test needs no network and does not wait for a timeout."""
    arm = {k: sim.env()[k] for k in ("ARM_ENDPOINT", "AZURE_CA_BUNDLE", "TARGET_SUBSCRIPTIONS")}
    env = {
        **arm,
        "PATH": "/nonexistent",  # no az, azd or pwsh to ask
        "HOME": str(tmp_path),  # no token cache
        "AZURE_POD_IDENTITY_AUTHORITY_HOST": imds_without_identity,
    }
    before = len(sim.request_log())
    done = _cli(["sweep", "--apply", "--yes"], env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("avma-remediator: no Azure credential: run az login, or set AZURE_TENANT_ID")
    # what DefaultAzureCredential tried, each with its own answer, whole
    for tried in (
        "EnvironmentCredential:",
        "ManagedIdentityCredential: ManagedIdentityCredential authentication unavailable.",
        "Identity not found",
        "AzureCliCredential: Azure CLI not found on path",
        "AzureDeveloperCliCredential:",
        "'azd auth login'",  # the end of azd's message: what to do, not cut away
    ):
        assert tried in line, tried
    assert line.endswith(
        "(troubleshooting: https://aka.ms/azsdk/python/identity/defaultazurecredential/troubleshoot)"
    )
    assert len(sim.request_log()) == before


def test_the_chain_message_is_read_whole() -> None:
    """The text azure-identity builds (chained.py, ``_get_error_message``), continuation lines too."""
    from shared.azure.credentials import describe_failure

    message = (
        "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
        "Attempted credentials:\n"
        "\tEnvironmentCredential: EnvironmentCredential authentication unavailable. Environment variables "
        "are not fully configured.\n"
        "Visit https://aka.ms/azsdk/python/identity/environmentcredential/troubleshoot to troubleshoot this issue.\n"
        "\tAzureCliCredential: ERROR: AADSTS700082: The refresh token has expired due to inactivity. "
        "Please run 'az login' to set up an account\n"
        "To mitigate this issue, please refer to the troubleshooting guidelines here at "
        "https://aka.ms/azsdk/python/identity/defaultazurecredential/troubleshoot."
    )
    line = describe_failure(message, {})
    assert "\n" not in line
    assert line.startswith("no Azure credential: run az login")
    assert (
        "DefaultAzureCredential tried: EnvironmentCredential: EnvironmentCredential authentication unavailable. "
        "Environment variables are not fully configured. Visit "
        "https://aka.ms/azsdk/python/identity/environmentcredential/troubleshoot to troubleshoot this issue; "
        "AzureCliCredential: ERROR: AADSTS700082: The refresh token has expired due to inactivity. Please run "
        "'az login' to set up an account (troubleshooting: "
        "https://aka.ms/azsdk/python/identity/defaultazurecredential/troubleshoot)"
    ) in line


def test_a_long_error_line_keeps_its_end() -> None:
    """``_one_line`` used to cut at the limit, before the part that says what to do."""
    from shared.cli import _one_line

    text = "token request failed: " + "x" * 900 + " Please run 'az login' to set up an account"
    line = _one_line(text, limit=300)
    assert len(line) <= 310
    assert line.startswith("token request failed: ")
    assert line.endswith("Please run 'az login' to set up an account")
