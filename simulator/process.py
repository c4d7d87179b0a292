"""The simulator in a process of its own, driven from the parent through a pipe.

Benchmarks and the chaos run use it so that the engine under test keeps its own CPU (a simulator
on a thread of the same process shares the GIL with the engine and slows both). Every read-only
hook of :class:`~simulator.server.Simulator` (state dump, counters, run logs, faults …) and the
test hooks that change the estate are called by name and answered with plain data.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Final

from simulator.estate import Estate, EstateError
from simulator.identity import TOKEN_LIFETIME_S
from simulator.server import DEFAULT_LATENCY_S, Simulator

# The hooks a parent may call (Simulator methods that take and return plain data).
CALLS: Final = frozenset(
    {
        "env",
        "state_dump",
        "counters",
        "run_commands_per_fixed_vm",
        "max_concurrent_run_commands",
        "run_log",
        "run_logs",
        "vanished",
        "faults",
        "fault_events",
        "log_queries",
        "graph_queries",
        "delete_vm",
        "set_power_state",
        "set_agent_ready",
        "set_kms_reachable",
        "set_busy",
        "set_log_partial_error",
        "throttle_resource_graph",
    }
)
START_TIMEOUT_S: Final = 60.0


class SimulatorProcessError(RuntimeError):
    """The simulator process failed to start, died, or refused a call."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _child(conn: Connection, estate: dict[str, Any], options: dict[str, Any]) -> None:
    """The child process: run a Simulator and answer calls until told to stop (None) or orphaned.

    SIGTERM (``Process.terminate``, which ``stop`` uses on a child that does not exit) ends it
    through ``sim.stop()`` like a stop request, so its temporary CA directory does not stay behind.
    It is held back while the simulator starts, so it always lands where ``sim.stop()`` follows.
    """
    blockable = hasattr(signal, "pthread_sigmask")
    if blockable:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        sim = Simulator(Estate.from_dict(estate), **options).start()
    except (EstateError, OSError, ValueError) as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    try:
        if blockable:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending one lands here
        conn.send(("ready", sim.env()))
        while True:
            try:
                request = conn.recv()
            except EOFError:  # the parent went away
                break
            if request is None:
                break
            name, args = request
            try:
                conn.send(("ok", getattr(sim, name)(*args)))
            except (KeyError, ValueError, TypeError) as error:
                conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        sim.stop()


class SimulatorProcess:
    """``with SimulatorProcess(estate, latency_s=…) as sim: sim.env(); sim.call("faults")``."""

    def __init__(
        self,
        estate: Estate,
        *,
        latency_s: float = DEFAULT_LATENCY_S,
        page_size: int = 100,
        token_lifetime_s: float = TOKEN_LIFETIME_S,
    ) -> None:
        self._estate = estate.to_dict()
        self._options = {"latency_s": latency_s, "page_size": page_size, "token_lifetime_s": token_lifetime_s}
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._env: dict[str, str] = {}

    def start(self) -> SimulatorProcess:
        if self._process is not None:
            return self
        context = multiprocessing.get_context("spawn")  # no inherited threads or event loops
        parent, child = context.Pipe()
        process = context.Process(
            target=_child, args=(child, self._estate, self._options), name="avma-simulator", daemon=True
        )
        process.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            process.kill()
            raise SimulatorProcessError(f"the simulator did not start within {START_TIMEOUT_S:g} s")
        status, payload = parent.recv()
        if status != "ready":
            process.join(5)
            raise SimulatorProcessError(f"the simulator did not start: {payload}")
        self._conn, self._process, self._env = parent, process, dict(payload)
        return self

    def env(self) -> dict[str, str]:
        """The settings that point the engine at this simulator (:meth:`Simulator.env`)."""
        return dict(self._env)

    def call(self, name: str, *args: Any) -> Any:
        """Call a :class:`Simulator` hook in the child process and return its answer."""
        if name not in CALLS:
            raise ValueError(f"{name!r} is not a simulator hook that can be called across processes")
        if self._conn is None:
            raise SimulatorProcessError("the simulator process is not running")
        try:
            self._conn.send((name, args))
            status, payload = self._conn.recv()
        except (EOFError, OSError) as error:
            raise SimulatorProcessError(f"the simulator process went away: {error}") from error
        if status != "ok":
            raise SimulatorProcessError(f"{name}: {payload}")
        return payload

    def stop(self) -> None:
        conn, process = self._conn, self._process
        self._conn, self._process = None, None
        if conn is not None:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
            conn.close()
        if process is not None:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
