"""Ctrl-C and SIGTERM during a CLI run: start no new VM, let the ones in flight finish, keep the record.

On the first SIGINT or SIGTERM the run starts no new VM, and no VM in flight sends a further Run
Command (one whose detection is done ends ``deferred: interrupted`` before its remediation, so it
was not changed); the Run Commands already running are waited for, at most for a bound. Then the
run ends with the results so far, printed in the chosen format and written to ``--out`` (and a
plan to ``--out-plan``), exit 130. A VM whose Run Command is still running when the bound passes,
or at a second signal (which stops at once), is reported ``deferred: interrupted`` too, with a hint
that it may still change: Run Command cannot be cancelled ("You can't cancel a running script",
MicrosoftDocs/azure-compute-docs ``articles/virtual-machines/windows/run-command.md``,
Restrictions), so a script already sent may still run to its end, and the record must say so.

The bounds:

- SIGINT (a person at the terminal): ``SIGINT_GRACE_S``, 90 s. "The minimum time to run a script
  is about 20 seconds" (same page); 90 s leaves room for one detection or remediation with its
  activation attempt (an estimate, not a measured figure), and a person who will not wait
  presses Ctrl-C again.
- SIGTERM (a supervisor stopping the process): ``SIGTERM_GRACE_S``, 8 s, inside the shortest
  common kill delay: Docker sends SIGKILL 10 s after SIGTERM by default on Linux (docker/cli
  ``docs/reference/commandline/container_stop.md``: the daemon's ``default-stop-timeout``), and
  Kubernetes after ``terminationGracePeriodSeconds``, 30 s by default (kubernetes/website
  ``content/en/docs/concepts/workloads/pods/pod-lifecycle.md``, "Termination of Pods"). Writing
  the record before the SIGKILL matters more than waiting for a Run Command that takes longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

from shared.model import Outcome, OutcomeKind, VmId
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, Checker

SIGINT_GRACE_S = 90.0
SIGTERM_GRACE_S = 8.0
INTERRUPTED = "interrupted"
STOPPED_HINT = {
    "detect": "The run was interrupted before this VM's detection: no Run Command was sent to it. "
    "Run it again (--from RESULT_FILE).",
    "remediate": "The run was interrupted after this VM's detection and before its remediation: "
    "nothing in it was changed. Run it again (--from RESULT_FILE).",
}
INTERRUPTED_HINT = (
    "The run was interrupted while this VM was being worked on: a Run Command may have been sent and "
    "may still change it (Run Command cannot be cancelled). Check it again: avma-remediator check <id>."
)

_T = TypeVar("_T")


class Interrupt:
    """SIGINT and SIGTERM for one run: the first asks the run to stop, a second aborts it."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        grace_s: dict[int, float] | None = None,
    ) -> None:
        self._stream = stream or sys.stderr
        self._grace = grace_s or {signal.SIGINT: SIGINT_GRACE_S, signal.SIGTERM: SIGTERM_GRACE_S}
        self.requested = asyncio.Event()
        self.aborted = asyncio.Event()
        self.signal: int | None = None
        self.in_flight: dict[VmId, float] = {}  # VM → when its check started
        self._idle = asyncio.Event()
        self._idle.set()
        self._handled: tuple[asyncio.AbstractEventLoop, tuple[int, ...]] | None = None

    @property
    def grace_s(self) -> float:
        return self._grace.get(self.signal or signal.SIGINT, SIGINT_GRACE_S)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Handle SIGINT and SIGTERM on the running loop for the duration (main thread only;
        elsewhere the signals keep their handlers and Ctrl-C ends the run as before)."""
        loop = asyncio.get_running_loop()
        added: list[int] = []
        before: dict[int, Any] = {}
        for sig in (int(signal.SIGINT), int(signal.SIGTERM)):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self.trigger, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or Windows
                continue
            added.append(sig)
            before[sig] = previous
        self._handled = (loop, tuple(added))
        try:
            yield self
        finally:
            self._handled = None
            for sig in added:
                loop.remove_signal_handler(sig)  # which leaves SIG_DFL: put back what was there
                if before[sig] is not None:
                    signal.signal(sig, before[sig])

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """For a read that blocks the loop (the question before a change, at a terminal): while it
        blocks, the loop cannot run the handlers :meth:`installed` added, so a Ctrl-C would wait,
        unseen, until the answer, and then cut short the run the person had just confirmed. Here
        SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the read instead; the loop's handlers
        come back after it."""
        if self._handled is None:
            yield
            return
        loop, added = self._handled
        for sig in added:
            loop.remove_signal_handler(sig)
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in added}
        try:
            yield
        finally:
            for sig in added:
                signal.signal(sig, previous[sig])
                loop.add_signal_handler(sig, self.trigger, sig)

    def trigger(self, sig: int) -> None:
        if not self.requested.is_set():
            self.signal = sig
            self.requested.set()
            n = len(self.in_flight)
            self._say(
                f"{signal.Signals(sig).name}: starting no new VM; waiting up to {self.grace_s:.0f} s for "
                f"the {n} VM{'s' if n != 1 else ''} in flight, then writing the results so far "
                "(press Ctrl-C again to stop at once)"
            )
            return
        if not self.aborted.is_set():
            self.aborted.set()
            self._say("stopping at once: the VMs still in flight are reported 'interrupted'")

    def _say(self, text: str) -> None:
        self._stream.write(f"avma-remediator: {text}\n")
        self._stream.flush()

    def started(self, vm_id: VmId) -> None:
        self.in_flight[vm_id] = time.monotonic()
        self._idle.clear()

    def finished(self, vm_id: VmId) -> None:
        self.in_flight.pop(vm_id, None)
        if not self.in_flight:
            self._idle.set()

    async def run(self, work: Awaitable[_T]) -> tuple[_T | None, list[Outcome]]:
        """Run ``work`` to its end, or, once a signal came, until the VMs in flight are done (at
        most ``grace_s``, or a second signal), then cancel it. Gives ``(its result or None, the
        outcomes of the VMs cut off in flight)``."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result(), []
        idle = asyncio.ensure_future(self._idle.wait())
        abort = asyncio.ensure_future(self.aborted.wait())
        try:
            await asyncio.wait({task, idle, abort}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            abort.cancel()
        cut = [
            Outcome(str(vm_id), OutcomeKind.DEFERRED, INTERRUPTED, INTERRUPTED_HINT, {"phase": "unknown"})
            for vm_id in sorted(self.in_flight, key=str)
        ]
        if task.done():
            return task.result(), []
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None, cut


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt``, as Ctrl-C does, for the whole process's run (main
    thread only): before the run's own handlers are installed (loading the estate, starting the
    simulator, checking the credential) a SIGTERM would otherwise kill the process at once, with
    nothing said and the simulator's temporary CA left on disk; this way every ``with`` block
    unwinds and the CLI ends with exit 130."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunStopped(Exception):
    """Raised before a Run Command once a signal came: the VM in flight sends nothing more."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


class Interruptible:
    """A checker that, once a signal came, starts no VM (it waits to be cancelled instead) and lets
    the VMs in flight send no further Run Command: one whose detection is done ends ``deferred:
    interrupted`` before its remediation. It keeps :class:`Interrupt` told which VMs are in flight."""

    def __init__(self, inner: Checker, interrupt: Interrupt) -> None:
        self._inner, self._interrupt = inner, interrupt

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        """``before_run_command`` (a retry's ``detect_first``) is awaited after the signal check."""
        if self._interrupt.requested.is_set():
            await asyncio.Event().wait()  # never set: the run cancels this once the VMs in flight are done
        self._interrupt.started(vm_id)
        try:
            return await self._inner.check(
                vm_id, listed=listed, before_run_command=self._hook(before_run_command)
            )
        except RunStopped as stopped:
            return Outcome(
                str(vm_id),
                OutcomeKind.DEFERRED,
                INTERRUPTED,
                STOPPED_HINT[stopped.phase],
                {"phase": stopped.phase},
            )
        finally:
            self._interrupt.finished(vm_id)

    def _hook(self, then: BeforeRunCommand | None) -> BeforeRunCommand:
        if then is None:
            return self._stop_if_asked
        after = then

        async def before(phase: str, details: Mapping[str, Any]) -> None:
            await self._stop_if_asked(phase, details)
            await after(phase, details)

        return before

    async def _stop_if_asked(self, phase: str, _: Mapping[str, Any]) -> None:
        if self._interrupt.requested.is_set():
            raise RunStopped(phase)
