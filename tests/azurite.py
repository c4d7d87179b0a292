"""Azurite (the Azure Storage emulator from npm) for the test session.

The queue and ledger tests run against the real storage protocol, not a mock, so that ETag
conditions, 409/412 answers and paging behave as in Azure. Azurite is pinned in ``package.json``
and installed with ``npm ci`` on first use. Each session picks its own free loopback ports, so
parallel runs and a developer's own Azurite on 10000-10002 never clash.

Set ``AZURITE_CONNECTION_STRING`` to reuse an Azurite that is already running (it is then neither
started nor stopped here, and cannot be restarted by chaos tests).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ACCOUNT = "devstoreaccount1"
# The emulator's well-known, publicly documented development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
READY_TIMEOUT_S = 30.0
NPM_TIMEOUT_S = 600.0
# --skipApiVersionCheck: the Python SDKs send an x-ms-version newer than Azurite knows.
# --inMemoryPersistence: nothing on disk, every session starts empty.
FLAGS = ("--silent", "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--loose")


class AzuriteError(RuntimeError):
    """Azurite could not be installed, started or stopped; the message says what to do."""


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = HOST) -> str:
    """The development account with explicit endpoints (``UseDevelopmentStorage=true`` means 10000-10002)."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{ACCOUNT};"
    )


def azurite_binary(repo_root: Path = REPO_ROOT) -> Path:
    """``node_modules/.bin/azurite``, running ``npm ci`` once when it is missing."""
    binary = repo_root / "node_modules" / ".bin" / "azurite"
    if shutil.which("node") is None:
        raise AzuriteError(
            "node is not on PATH: the queue and ledger tests need Node.js (20+) and npm to run Azurite"
        )
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteError(f"npm is not on PATH: cannot install Azurite ({binary} is missing; run `npm ci`)")
    # Two test runs starting at once must not run `npm ci` over each other.
    lock_name = "avma-azurite-npm-" + hashlib.sha256(str(repo_root).encode()).hexdigest()[:16] + ".lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=repo_root,
                    capture_output=True,
                    text=True,
                    timeout=NPM_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired as error:
                raise AzuriteError(f"`npm ci` did not finish in {NPM_TIMEOUT_S:.0f} s") from error
            if done.returncode != 0 or not binary.exists():
                tail = (done.stdout + done.stderr).strip()[-2000:]
                raise AzuriteError(f"`npm ci` failed (exit {done.returncode}) in {repo_root}:\n{tail}")
    return binary


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out; held together so that the three differ."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


@dataclass
class Azurite:
    """One Azurite process on loopback, in memory; ``restart()`` keeps its ports (for chaos tests)."""

    blob_port: int
    queue_port: int
    table_port: int
    owned: bool = True
    binary: Path | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="azurite-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.table_port)

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.blob_port, self.queue_port, self.table_port)

    @property
    def log_path(self) -> Path:
        return self.workdir / "azurite.log"

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the process and wait until all three ports accept connections."""
        if not self.owned:
            return
        if self.binary is None:
            self.binary = azurite_binary()
        command = [str(self.binary), *FLAGS]
        for service, port in zip(("blob", "queue", "table"), self.ports, strict=True):
            command += [f"--{service}Host", HOST, f"--{service}Port", str(port)]
        env = {k: v for k, v in os.environ.items() if k != "AZURITE_ACCOUNTS"}  # keep the well-known account
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise AzuriteError(f"Azurite exited with code {code} while starting:\n{self.log_tail()}")
            if all(_accepts(port) for port in self.ports):
                return
            time.sleep(0.05)
        self.stop()
        raise AzuriteError(
            f"Azurite did not listen on {HOST} ports {self.ports} within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate, then kill if it does not exit; safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Stop and start on the same ports; the in-memory data is gone afterwards."""
        if not self.owned:
            raise AzuriteError("this Azurite was not started by the tests (AZURITE_CONNECTION_STRING)")
        self.stop()
        deadline = time.monotonic() + timeout_s
        # Node needs about a second to release its ports; a start that races it exits with EADDRINUSE.
        while True:
            while any(_accepts(port) for port in self.ports) and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                self.start(timeout_s=max(1.0, deadline - time.monotonic()))
            except AzuriteError:
                if "EADDRINUSE" not in self.log_tail() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
            else:
                return

    def close(self) -> None:
        """Stop for good and remove the working folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _from_environment(text: str) -> Azurite:
    ports: dict[str, int] = {}
    for part in text.split(";"):
        name, _, value = part.partition("=")
        if name.endswith("Endpoint") and "://" in value:
            port_text = value.split("://", 1)[1].split("/", 1)[0].rpartition(":")[2]
            if port_text.isdigit():
                ports[name[: -len("Endpoint")].lower()] = int(port_text)
    defaults = {"blob": 10000, "queue": 10001, "table": 10002}
    if text.strip() != "UseDevelopmentStorage=true" and not {"queue", "table"} <= ports.keys():
        raise AzuriteError("AZURITE_CONNECTION_STRING needs explicit QueueEndpoint and TableEndpoint")
    merged = {**defaults, **ports}
    azurite = Azurite(merged["blob"], merged["queue"], merged["table"], owned=False)
    if not (_accepts(azurite.queue_port) and _accepts(azurite.table_port)):
        raise AzuriteError(f"AZURITE_CONNECTION_STRING is set but nothing listens on {azurite.ports}")
    return azurite


def start_azurite(attempts: int = 3) -> Azurite:
    """An Azurite for this session: the one named by ``AZURITE_CONNECTION_STRING``, or a new one."""
    existing = os.environ.get("AZURITE_CONNECTION_STRING", "").strip()
    if existing:
        return _from_environment(existing)
    binary = azurite_binary()
    for attempt in range(1, attempts + 1):
        blob, queue, table = _free_ports(3)
        azurite = Azurite(blob, queue, table, binary=binary)
        atexit.register(azurite.close)  # also on an interrupted session
        try:
            azurite.start()
        except AzuriteError:
            # Another process may have taken a port between choosing and listening: choose again.
            retry = "EADDRINUSE" in azurite.log_tail() and attempt < attempts
            azurite.close()
            if not retry:
                raise
        else:
            return azurite
    raise AzuriteError("unreachable")  # pragma: no cover
