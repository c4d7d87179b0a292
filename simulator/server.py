"""The simulator's servers and their lifecycle: ARM over real HTTPS, managed identity over HTTP.

ARM listens on loopback with a certificate from a throwaway trustme CA (the PEM is written to a
temporary directory, ``ca_bundle``), so the real Azure SDK talks to it exactly as to Azure, bearer
token policy included. The same HTTPS server also answers Resource Graph (an ARM provider) and the
Log Analytics query API (``/v1/workspaces/…``), which checks the audience its tokens were issued
for. The token endpoint is plain HTTP on its own port, as App Service's is.

Two ways to run it: :class:`Simulator` runs both servers on a background thread with its own event
loop (tests, the CLI's ``--simulate``); :func:`serve_forever` runs them in the caller's loop (a
standalone ``simulator serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import shutil
import signal
import ssl
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trustme
from aiohttp import web

from simulator.arm import ArmResponse, Compute, arm_error, server_error
from simulator.estate import Estate
from simulator.identity import TOKEN_LIFETIME_S, TokenIssuer
from simulator.monitor import LOG_ANALYTICS_AUDIENCES, LogAnalytics, ResourceGraph, default_workspace_id
from simulator.network_api import NetworkApi

DEFAULT_LATENCY_S: Final = 0.05
SERVE_LATENCY_S: Final = 0.5
_MAX_BODY: Final = 1024 * 1024
ARM_RESOURCE: Final = "https://management.azure.com"


class SimulatorServer:
    """Both servers in the current event loop; :meth:`start` and :meth:`stop` are awaited there."""

    def __init__(
        self,
        estate: Estate,
        *,
        host: str = "127.0.0.1",
        arm_port: int = 0,
        identity_port: int = 0,
        latency_s: float = DEFAULT_LATENCY_S,
        page_size: int = 100,
        workspace_id: str | None = None,
        render_descriptions: bool = True,
        client_id: str | None = None,
        token_lifetime_s: float = TOKEN_LIFETIME_S,
    ) -> None:
        self.estate = estate
        self.compute = Compute(estate, latency_s=latency_s, page_size=page_size)
        self.graph = ResourceGraph(self.compute)
        self.network = NetworkApi(estate, latency_s=latency_s, count=self.compute.count)
        self.logs = LogAnalytics(
            self.compute,
            workspace_id=workspace_id or default_workspace_id(estate.subscriptions),
            audience=LOG_ANALYTICS_AUDIENCES[estate.cloud],
            render_descriptions=render_descriptions,
        )
        # The app's identity: system-assigned (None) or the user-assigned one with this client id.
        self.tokens = TokenIssuer(client_id=client_id, lifetime_s=token_lifetime_s)
        # The resource each issued token was asked for: Log Analytics accepts only its own audience.
        self._audiences: dict[str, str] = {}
        self._audiences_lock = threading.Lock()
        # Every request to the HTTPS server (ARM, Resource Graph, Log Analytics), in arrival order.
        self._request_log: list[dict[str, Any]] = []
        self._request_log_lock = threading.Lock()
        # The TLS connections requests arrived on (counted as ``tls_connection``): reuse shows as
        # fewer connections than requests. Weak, so that a closed connection is not kept alive.
        self._connections: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._host = host
        self._ports = (arm_port, identity_port)
        self._runners: list[web.AppRunner] = []
        self._workdir: Path | None = None
        self.arm_endpoint = ""
        self.identity_endpoint = ""
        self.ca_bundle = ""

    @property
    def identity_header(self) -> str:
        return self.tokens.header_secret

    def env(self) -> dict[str, str]:
        """The settings that point the engine (and azure-identity) at this simulator."""
        return {
            "ARM_ENDPOINT": self.arm_endpoint,
            "AZURE_CA_BUNDLE": self.ca_bundle,
            "IDENTITY_ENDPOINT": self.identity_endpoint,
            "IDENTITY_HEADER": self.identity_header,
            **({"AZURE_CLIENT_ID": self.tokens.client_id} if self.tokens.client_id else {}),
            "TARGET_SUBSCRIPTIONS": ",".join(self.estate.subscriptions),
            "LOG_ANALYTICS_ENDPOINT": f"{self.arm_endpoint}/v1",
            "LOG_ANALYTICS_WORKSPACE_ID": self.logs.workspace_id,
            # One status poll per Run Command: the first poll lands when the command is done.
            "POLL_INTERVAL_SECONDS": f"{max(self.compute.latency_s, 0.01):g}",
        }

    async def start(self) -> None:
        if self._runners:
            return
        self._workdir = Path(tempfile.mkdtemp(prefix="avma-sim-"))
        try:
            ca = trustme.CA()
            self.ca_bundle = str(self._workdir / "ca.pem")
            ca.cert_pem.write_to_path(self.ca_bundle)
            names = sorted({"127.0.0.1", "localhost", self._host})
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(*names).configure_cert(tls)
            arm_port = await self._serve(self._arm_app(), self._ports[0], tls)
            identity_port = await self._serve(self._identity_app(), self._ports[1], None)
        except BaseException:
            await self.stop()
            raise
        shown = f"[{self._host}]" if ":" in self._host else self._host
        self.arm_endpoint = f"https://{shown}:{arm_port}"
        self.identity_endpoint = f"http://{shown}:{identity_port}/msi/token"

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def _serve(self, app: web.Application, port: int, tls: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, self._host, port, ssl_context=tls).start()
        address = runner.addresses[-1]
        return int(address[1])

    def _arm_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._arm)
        return app

    def _identity_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/msi/token", self._token)
        return app

    def issue_token(self, resource: str = ARM_RESOURCE) -> str:
        """A bearer token for ``resource`` (ARM by default), as the identity endpoint would give."""
        answer = self.tokens.issue(resource)
        self._remember(answer["access_token"], resource)
        return answer["access_token"]

    def _remember(self, token: str, resource: str) -> None:
        with self._audiences_lock:
            self._audiences[token] = resource

    def _audience(self, header: str | None) -> str | None:
        """The resource a valid simulator bearer token was issued for, or None."""
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not self.tokens.is_valid(token):
            return None
        with self._audiences_lock:
            return self._audiences.get(token)

    def request_log(self) -> list[dict[str, Any]]:
        """Every request so far: method, path and query (what an RBAC check would see), oldest first."""
        with self._request_log_lock:
            return [dict(entry) for entry in self._request_log]

    def _note_connection(self, request: web.Request) -> None:
        """Count each TLS connection once, on its first request (every request comes over TLS here)."""
        transport = request.transport
        if transport is None:
            return
        with self._request_log_lock:
            if transport in self._connections:
                return
            self._connections.add(transport)
        self.compute.count("tls_connection")

    async def _arm(self, request: web.Request) -> web.Response:
        self._note_connection(request)
        with self._request_log_lock:
            self._request_log.append(
                {"method": request.method, "path": request.path, "query": dict(request.query.items())}
            )
        body = await request.read() if request.can_read_body else b""
        parts = [p for p in request.path.split("/") if p]
        if parts and parts[0].lower() == "v1":
            self.compute.count("log_query")
            audience = self._audience(request.headers.get("Authorization"))
            return _send(self.logs.handle(request.method, parts, body, token_audience=audience))
        header = request.headers.get("Authorization")
        if header is None:
            self.compute.count("unauthorized")
            return _send(
                arm_error(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is missing.",
                )
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self.tokens.is_valid(token.strip()):
            self.compute.count("unauthorized")
            return _send(arm_error(401, "InvalidAuthenticationToken", "The access token is invalid."))
        query = dict(request.query.items())
        if [p.lower() for p in parts] == ["providers", "microsoft.resourcegraph", "resources"]:
            return _send(self._resource_graph(request.method, query, body))
        if NetworkApi.handles(request.path):
            return _send(self.network.handle(request.method, request.path, query, base_url=self.arm_endpoint))
        answer = self.compute.handle(request.method, request.path, query, body, base_url=self.arm_endpoint)
        return _send(answer)

    def _resource_graph(self, method: str, query: dict[str, str], body: bytes) -> ArmResponse:
        self.compute.count("resource_graph")
        if method != "POST":
            return arm_error(405, "MethodNotAllowed", f"{method} is not allowed on Resource Graph queries")
        if not any(k.lower() == "api-version" and v for k, v in query.items()):
            return arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        faults = self.compute.faults
        if faults.fire("serverError", "resource graph"):
            return server_error(faults.draw("serverError"), "", self.compute.latency_s)
        return self.graph.handle(body)

    async def _token(self, request: web.Request) -> web.Response:
        self.compute.count("token")
        query = dict(request.query.items())
        if self.compute.faults.fire("tokenError", query.get("resource", "")):
            # The App Service identity endpoint's error shape; the wording is the simulator's own.
            body = {
                "statusCode": 500,
                "message": "An unexpected error occurred while fetching the AAD Token.",
                "correlationId": str(uuid.uuid4()),
            }
            return web.json_response(body, status=500)
        answer = self.tokens.answer(query, request.headers.get("X-IDENTITY-HEADER"))
        if answer.status == 200:
            self._remember(str(answer.body["access_token"]), str(answer.body["resource"]))
        return web.json_response(dict(answer.body), status=answer.status)


def _send(answer: ArmResponse) -> web.Response:
    headers = {**answer.headers, "x-ms-request-id": str(uuid.uuid4())}
    if answer.body is None:
        return web.Response(status=answer.status, headers=headers)
    payload = json.dumps(answer.body, separators=(",", ":")).encode()
    return web.Response(status=answer.status, body=payload, content_type="application/json", headers=headers)


class Simulator:
    """The simulated estate on a background thread: ``with Simulator(estate) as sim: …``."""

    def __init__(
        self,
        estate: Estate | None = None,
        *,
        latency_s: float = DEFAULT_LATENCY_S,
        page_size: int = 100,
        host: str = "127.0.0.1",
        arm_port: int = 0,
        identity_port: int = 0,
        workspace_id: str | None = None,
        render_descriptions: bool = True,
        client_id: str | None = None,
        token_lifetime_s: float = TOKEN_LIFETIME_S,
    ) -> None:
        self.estate = estate if estate is not None else Estate.default()
        self.server = SimulatorServer(
            self.estate,
            host=host,
            arm_port=arm_port,
            identity_port=identity_port,
            latency_s=latency_s,
            page_size=page_size,
            workspace_id=workspace_id,
            render_descriptions=render_descriptions,
            client_id=client_id,
            token_lifetime_s=token_lifetime_s,
        )
        self.compute = self.server.compute
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Start both servers (idempotent); return once they accept connections."""
        if self._thread is not None:
            return self
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)), name="avma-simulator", daemon=True
        )
        thread.start()
        self._thread = thread
        try:
            ready.result(timeout=60)
        except BaseException:
            # A Ctrl-C or SIGTERM while waiting must not leave the servers running, nor their CA on
            # disk: let the start finish (or fail), then stop it; a second signal does not cut that short.
            with contextlib.suppress(BaseException):
                ready.result(timeout=60)
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers and remove the CA directory (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(timeout=60)

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as error:  # noqa: BLE001 - handed to start(), which re-raises it in its thread
            ready.set_exception(error)
            return
        ready.set_result(None)
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    def __enter__(self) -> Simulator:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ endpoints

    @property
    def arm_endpoint(self) -> str:
        return self.server.arm_endpoint

    @property
    def ca_bundle(self) -> str:
        return self.server.ca_bundle

    @property
    def identity_endpoint(self) -> str:
        return self.server.identity_endpoint

    @property
    def identity_header(self) -> str:
        return self.server.identity_header

    def env(self) -> dict[str, str]:
        return self.server.env()

    @property
    def workspace_id(self) -> str:
        return self.server.logs.workspace_id

    def issue_token(self, resource: str = ARM_RESOURCE) -> str:
        """A bearer token for ``resource`` (ARM by default), for clients that bring their own credential."""
        return self.server.issue_token(resource)

    # ------------------------------------------------------------------ test hooks

    def state_dump(self) -> dict[str, dict[str, Any]]:
        return self.compute.state_dump()

    def counters(self) -> dict[str, Any]:
        return self.compute.counters()

    def run_commands_per_fixed_vm(self) -> float | None:
        """Run Commands started per VM that ended licensed on the KMS channel having been changed
        (remediated), over those VMs; None when none was (issue 12: 1 in the common case)."""
        fixed = [
            entry["runCommands"]
            for entry in self.state_dump().values()
            if entry.get("changed")
            and entry.get("channel") == "KMS_CLIENT"
            and entry.get("licenseStatus") == 1
        ]
        return round(sum(fixed) / len(fixed), 3) if fixed else None

    def max_concurrent_run_commands(self) -> int:
        return self.compute.max_concurrent_run_commands()

    def run_log(self, vm_id: str) -> list[dict[str, Any]]:
        return self.compute.run_log(vm_id)

    def run_logs(self) -> dict[str, list[dict[str, Any]]]:
        """Every VM's run log (deleted VMs included), keyed by estate id."""
        return self.compute.run_logs()

    def vanished(self) -> dict[str, str]:
        """VMs deleted or no longer in their estate power state: id → ``deleted`` or the state."""
        return self.compute.vanished()

    def faults(self) -> dict[str, int]:
        """Faults the simulator injected so far, per kind (every kind listed; docs/simulator.md)."""
        return self.compute.faults.counts()

    def fault_events(self) -> list[dict[str, Any]]:
        """The most recent injected faults: kind, target, detail, monotonic time."""
        return self.compute.faults.events()

    def delete_vm(self, vm_id: str) -> None:
        self.compute.delete_vm(vm_id)

    def set_power_state(self, vm_id: str, state: str) -> None:
        self.compute.set_power_state(vm_id, state)

    def set_agent_ready(self, vm_id: str, ready: bool) -> None:
        self.compute.set_agent_ready(vm_id, ready)

    def swap_os_disk(self, vm_id: str) -> str:
        """A new OS disk id on the VM, its guest back in the estate's state (docs/simulator.md)."""
        return self.compute.swap_os_disk(vm_id)

    def set_kms_reachable(self, vm_id: str, reachable: bool) -> None:
        self.compute.set_kms_reachable(vm_id, reachable)

    def set_busy(self, vm_id: str, seconds: float) -> None:
        self.compute.set_busy(vm_id, seconds)

    def set_log_partial_error(self, on: bool) -> None:
        """Log Analytics answers with half the rows and the PartialError body while ``on``."""
        self.server.logs.set_partial_error(on)

    def log_queries(self) -> list[dict[str, Any]]:
        """Every Log Analytics query: workspace, query, timespan, start, end, audience, status, rows."""
        return self.server.logs.queries()

    def throttle_resource_graph(
        self, requests: int, resets_after_s: int = 5, retry_after_s: int | None = None
    ) -> None:
        """The next ``requests`` Resource Graph queries get 429 ``RateLimiting`` (see docs/simulator.md).
        Positional too, so that ``SimulatorProcess.call`` (positional arguments only) can set each."""
        self.server.graph.throttle(requests, resets_after_s=resets_after_s, retry_after_s=retry_after_s)

    def request_log(self) -> list[dict[str, Any]]:
        """Every HTTPS request the simulator received: method, path and query, oldest first."""
        return self.server.request_log()

    def graph_queries(self) -> list[dict[str, Any]]:
        """Every Resource Graph query: kind, subscriptions, managementGroups, top, skipToken, rows, status."""
        return self.server.graph.queries()

    def throttling(self) -> dict[str, Any]:
        """ARM's budgets and Resource Graph's quota so far: model, time scale, requests and 429s per
        subscription and kind, Resource Graph's (docs/simulator.md, "Throttling")."""
        return self.compute.throttle.stats()


async def start_server(
    estate: Estate,
    *,
    host: str = "127.0.0.1",
    arm_port: int = 0,
    identity_port: int = 0,
    latency_s: float = SERVE_LATENCY_S,
    page_size: int = 100,
) -> SimulatorServer:
    """Start the servers in the running loop and return the handle; the caller awaits ``stop()``."""
    server = SimulatorServer(
        estate,
        host=host,
        arm_port=arm_port,
        identity_port=identity_port,
        latency_s=latency_s,
        page_size=page_size,
    )
    await server.start()
    return server


async def serve_forever(
    estate: Estate,
    *,
    host: str = "127.0.0.1",
    arm_port: int = 0,
    identity_port: int = 0,
    latency_s: float = SERVE_LATENCY_S,
    page_size: int = 100,
    on_ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Serve until cancelled; ``on_ready(env)`` gets :meth:`SimulatorServer.env` once both ports listen.

    It prints nothing itself. A caller that needs the handle (state dumps, hooks) uses
    :func:`start_server` instead.
    """
    server = await start_server(
        estate,
        host=host,
        arm_port=arm_port,
        identity_port=identity_port,
        latency_s=latency_s,
        page_size=page_size,
    )
    try:
        if on_ready is not None:
            on_ready(server.env())
        await asyncio.Event().wait()
    finally:
        await server.stop()


class ServeError(RuntimeError):
    """The standalone simulator could not start listening; the message is one line."""


def serve_until_stopped(
    estate: Estate,
    *,
    host: str = "127.0.0.1",
    arm_port: int = 0,
    identity_port: int = 0,
    latency_s: float = SERVE_LATENCY_S,
    on_ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """``simulator serve``: run :func:`serve_forever` until SIGINT (Ctrl-C) or SIGTERM.

    Either signal ends it the same way: the servers stop and the temporary CA directory is removed
    (SIGTERM's default action would end the process with the CA left in the temporary directory).
    A port that cannot be bound (in use, privileged) raises :class:`ServeError` naming it, with
    nothing left behind (``SimulatorServer.start`` cleans up what it had started).
    """

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # no add_signal_handler on Windows
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await serve_forever(
                estate,
                host=host,
                arm_port=arm_port,
                identity_port=identity_port,
                latency_s=latency_s,
                on_ready=on_ready,
            )
        except asyncio.CancelledError:
            if not task.cancelling():
                raise
            task.uncancel()  # SIGTERM: serve_forever's finally has stopped and cleaned up

    try:
        with contextlib.suppress(KeyboardInterrupt):  # asyncio.run cancels main, which cleans up
            asyncio.run(main())
    except OSError as error:
        text = " ".join(str(error).split()) or type(error).__name__
        ports = f"ARM port {arm_port}, identity port {identity_port}"
        raise ServeError(f"cannot listen on {host} ({ports}): {text}") from error
