"""``avma-remediator``: audit first, ``--apply`` second, and a rehearsal on a simulated estate.

Exit codes (shared/exitcodes.py): 0 all done; 1 some VM failed, a VM you named does not exist, or a
subscription could not be listed; 2 usage, configuration or credential error (nothing was checked);
3 nothing failed but some VM is still deferred after the run's own retries (run again later);
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from azure.core.credentials_async import AsyncTokenCredential

from shared.azure.compute import ComputeError, ComputeGateway
from shared.azure.credentials import NoCredential, check_credential, make_credential
from shared.azure.inventory import Inventory, InventoryError, resolve_query
from shared.cli_ledger import (
    LedgeredCheck,
    WithoutLedger,
    cli_owner,
    correlation_id,
    has_ledger,
    open_ledger,
)
from shared.exitcodes import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    run_exit_code,
)
from shared.filters import FilterError, VmFilter, filtered
from shared.inrun_retry import DEFAULT_FIRST_WAIT_S, RetryPolicy, RetryWait, retry_deferred, still_deferred
from shared.intake_cli import run_intake
from shared.ledger import Ledger, LedgerError
from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId
from shared.report import as_json, as_table, summary
from shared.scope import Scope
from shared.settings import ConfigError, Mode, Settings, is_subscription_id
from shared.sweep import Checker, SweepReport, sweep
from shared.vm import VmFacts
from shared.workflow import Remediator

DEFAULT_SIM_LATENCY_S = 0.3


class UsageError(Exception):
    """Bad arguments or input files: exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avma-remediator",
        description="Find Windows VMs stuck on AVMA (0xC004FD02) and move them to the Azure KMS.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def ids_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--ids",
            nargs="+",
            action="extend",
            default=[],
            metavar="VM_ID",
            help="these VMs (ARM resource ids, space-separated), read directly with no listing; "
            "each is still checked against the configured scope",
        )

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--apply", action="store_true", help="change VMs (default: audit, nothing changes)")
        p.add_argument("--concurrency", type=int, metavar="N", help="VMs worked on at once (MAX_CONCURRENCY)")
        p.add_argument("--output", choices=["table", "json"], default="table")
        p.add_argument(
            "--simulate",
            nargs="?",
            const="",
            metavar="ESTATE_FILE",
            help="run against a simulated estate (the built-in one, or ESTATE_FILE); no Azure needed",
        )
        p.add_argument("--sim-state-out", metavar="FILE", help="with --simulate: write the final VM states")
        p.add_argument(
            "--sim-latency",
            type=float,
            default=DEFAULT_SIM_LATENCY_S,
            metavar="SECONDS",
            help=f"with --simulate: simulated Run Command duration (default {DEFAULT_SIM_LATENCY_S})",
        )
        p.add_argument(
            "--retry-wait",
            type=float,
            metavar="SECONDS",
            help="first wait before this run checks a busy or throttled VM again (then x3, 3 retries; "
            f"default {DEFAULT_FIRST_WAIT_S:g}, with --simulate the simulated latency; 0: no retry)",
        )

    p_sweep = commands.add_parser(
        "sweep",
        help="every Windows VM in the subscriptions in scope",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_sweep.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="ID",
        help="subscription to sweep (repeatable; default TARGET_SUBSCRIPTIONS, else all visible)",
    )
    p_sweep.add_argument(
        "--resource-group",
        "-g",
        action="append",
        default=[],
        metavar="NAME",
        help="only VMs in this resource group (repeatable: any of them); narrows the scope, never widens it",
    )
    p_sweep.add_argument(
        "--name",
        "-n",
        action="append",
        default=[],
        metavar="VM_NAME",
        help="with --resource-group: only the VM of this name (repeatable)",
    )
    p_sweep.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="only VMs with this tag (a key alone or KEY=: any value; repeatable: every key must match, "
        "values of one key are alternatives)",
    )
    ids_option(p_sweep)
    run_options(p_sweep)

    p_check = commands.add_parser(
        "check",
        help="VMs by ARM resource id, or the VMs a computer name (an alert's Computer) names",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_check.add_argument("vm_id", nargs="*", metavar="VM_ID")
    ids_option(p_check)
    p_check.add_argument(
        "--computer",
        metavar="NAME",
        help="instead of VM_ID: the computer name of a log row or alert, resolved through Resource Graph "
        "(guest-reported name, osProfile name or VM name; an FQDN matches on its first label)",
    )
    run_options(p_check)

    p_intake = commands.add_parser(
        "intake", help="show the work items an Event Grid, alert or Log Analytics payload gives"
    )
    p_intake.add_argument("file", metavar="FILE|-", help="a JSON payload file, or - for standard input")

    p_sim = commands.add_parser("simulator", help="the simulated Azure estate")
    sim_commands = p_sim.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")
    p_serve = sim_commands.add_parser("serve", help="serve the simulator until interrupted")
    p_serve.add_argument("estate", nargs="?", default="", metavar="ESTATE_FILE")
    p_serve.add_argument("--latency", type=float, default=DEFAULT_SIM_LATENCY_S, metavar="SECONDS")
    p_serve.add_argument("--arm-port", type=int, default=0)
    p_serve.add_argument("--identity-port", type=int, default=0)
    p_serve.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=VALUE",
        help="inject a fault (repeatable): KIND=RATE, KIND=every:N[:burst:B], armThrottling=TIMESCALE; "
        "adds to the estate file's faults (docs/simulator.md)",
    )
    p_serve.add_argument("--fault-seed", type=int, metavar="N", help="seed of the fault schedules")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("azure").setLevel(logging.ERROR)
        for handler in logging.getLogger().handlers:  # the one basicConfig made on stderr
            if getattr(handler, "stream", None) is sys.stderr and not isinstance(
                handler.formatter, _FirstLine
            ):
                handler.setFormatter(_FirstLine(handler.formatter))
    # The CLI names a subscription it could not list itself, in one line (_print_report).
    sweep_log = logging.getLogger("shared.sweep")
    sweep_level = sweep_log.level
    sweep_log.setLevel(sweep_level if args.verbose else logging.CRITICAL)
    try:
        if args.command == "simulator":
            return _serve(args)
        if args.command == "intake":
            return run_intake(args.file, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
        return _run(args)
    except (ConfigError, UsageError, NoCredential) as error:
        print(f"avma-remediator: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("avma-remediator: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        sweep_log.setLevel(sweep_level)


def _run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and not 1 <= args.concurrency <= 512:
        raise UsageError("--concurrency must be between 1 and 512")
    if args.sim_state_out and args.simulate is None:
        raise UsageError("--sim-state-out needs --simulate")
    if args.simulate is None:
        return asyncio.run(_execute(args, dict(os.environ)))

    from simulator import Estate, EstateError, Simulator

    try:
        estate = Estate.load(Path(args.simulate)) if args.simulate else Estate.default()
    except (EstateError, OSError) as error:
        raise UsageError(f"estate file: {error}") from error
    if args.sim_latency < 0:
        raise UsageError("--sim-latency must not be negative")
    with Simulator(estate, latency_s=args.sim_latency) as sim, _environ(_simulated_env(sim.env())):
        code = asyncio.run(_execute(args, dict(os.environ)))
        if args.sim_state_out:
            Path(args.sim_state_out).write_text(json.dumps(sim.state_dump(), indent=2) + "\n")
        return code


async def _execute(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = Settings.from_env(env).with_mode(Mode.ENFORCE if args.apply else Mode.AUDIT)
    if args.concurrency is not None:
        settings = replace(settings, max_concurrency=args.concurrency)
    named, computer, vm_filter = _targets(args)
    policy = _retry_policy(args)
    subs = _subscriptions(args, settings)

    credential = make_credential(settings, env)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(credential)
        await check_credential(credential, settings, env)  # NoCredential: exit 2, before any VM
        gateway = await stack.enter_async_context(ComputeGateway(credential, settings))
        scope_inventory = await stack.enter_async_context(Inventory(credential, settings))
        checker: Checker = WithoutLedger(Remediator(gateway, settings), _say)
        ledger = await _ledger(settings, credential)
        if ledger is not None:
            stack.push_async_callback(ledger.close)
            checker = LedgeredCheck(
                Remediator(gateway, settings),
                ledger,
                owner=cli_owner(),
                correlation=correlation_id(args.command),
            )
        remediator = _Scoped(checker, Scope.from_settings(settings, scope_inventory))
        missing: list[str] = []
        with _progress(sys.stderr) as progress:
            if computer is not None:
                async with Inventory(credential, settings) as inventory:
                    try:
                        found = await inventory.resolve_computer(computer)
                    except InventoryError as error:
                        print(
                            f"avma-remediator: cannot resolve {computer!r}: {_inventory_problem(error)}",
                            file=sys.stderr,
                        )
                        logging.getLogger(__name__).info("Resource Graph answered: %s", error)
                        return EXIT_FAILED
                if not found:
                    where = Scope.from_settings(settings).describe()
                    missing.append(f"no VM in {where} has the computer name {computer!r}")
                    outcomes = [
                        Outcome(
                            f"computer:{computer}",
                            OutcomeKind.SKIPPED,
                            "not-found",
                            hint=NOT_FOUND_COMPUTER_HINT,
                            details={"computer": computer},
                        )
                    ]
                else:
                    outcomes = await _check_all(remediator, found, settings.max_concurrency, progress.outcome)
                report = SweepReport(outcomes=outcomes)
            elif named:
                outcomes = await _check_all(remediator, named, settings.max_concurrency, progress.outcome)
                report = SweepReport(outcomes=outcomes)
            else:
                if not subs:
                    try:
                        subs = await gateway.list_subscriptions()
                    except ComputeError as error:
                        print(
                            f"avma-remediator: cannot list subscriptions: {_arm_problem(error)}",
                            file=sys.stderr,
                        )
                        logging.getLogger(__name__).info("ARM answered: %s", error)
                        return EXIT_FAILED

                def list_vms(sub: str) -> AsyncIterator[VmFacts]:
                    return filtered(gateway.list_vms(sub), vm_filter)

                report = await sweep(
                    remediator,
                    list_vms if not vm_filter.empty else gateway.list_vms,
                    subs,
                    concurrency=settings.max_concurrency,
                    on_outcome=progress.outcome,
                )
                if not vm_filter.empty and not report.outcomes and not report.listing_errors:
                    print(
                        f"avma-remediator: no VM in {', '.join(subs)} matches {vm_filter.describe()}",
                        file=sys.stderr,
                    )

            async def again(vm_id: VmId) -> Outcome:
                return await remediator.check(vm_id)

            report.outcomes = await retry_deferred(
                report.outcomes,
                again,
                policy,
                settings,
                concurrency=settings.max_concurrency,
                on_wait=progress.waiting,
            )
        if named or computer is not None:
            missing += _named_missing(report.outcomes)
            report.outcomes = [_named_not_found(o) for o in report.outcomes]
    _print_report(report, args.output, settings.mode)
    for line in missing:
        print(f"avma-remediator: {line}", file=sys.stderr)
    deferred = still_deferred(report.outcomes)
    if deferred:
        print(
            f"avma-remediator: {deferred} VM{'s' if deferred != 1 else ''} still deferred: "
            "run again later (the hints say what to wait for)",
            file=sys.stderr,
        )
    return run_exit_code(
        report.outcomes, listing_errors=bool(report.listing_errors), named_missing=bool(missing)
    )


NOT_FOUND_HINT = (
    "No VM with this id exists (ARM answered 404): check its subscription, resource group and name."
)
NOT_FOUND_COMPUTER_HINT = (
    "No VM in scope carries this computer name (guest-reported name, osProfile name or VM name): "
    "check the name, and that the VM is in TARGET_SUBSCRIPTIONS or MANAGEMENT_GROUP_ID."
)


def _named_missing(outcomes: Sequence[Outcome]) -> list[str]:
    """A line for each VM the caller named by id that ARM does not know (``skipped: not-found``)."""
    return [
        f"VM {o.vm_id} does not exist (ARM answered 404)"
        for o in outcomes
        if o.kind is OutcomeKind.SKIPPED and o.reason == "not-found" and VmId.try_parse(o.vm_id) is not None
    ]


def _named_not_found(outcome: Outcome) -> Outcome:
    if outcome.kind is OutcomeKind.SKIPPED and outcome.reason == "not-found" and not outcome.hint:
        return replace(outcome, hint=NOT_FOUND_HINT)
    return outcome


async def _check_all(
    remediator: Checker, vm_ids: Sequence[VmId], concurrency: int, on_outcome: Callable[[Outcome], None]
) -> list[Outcome]:
    """Named VMs (``check`` ids, ``--ids``, a computer name's VMs), each once, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(max(1, concurrency))
    unique = list(dict.fromkeys(vm_ids))  # VmId compares as ARM does: an id given twice is one VM

    async def one(vm_id: VmId) -> Outcome:
        async with gate:
            outcome = await remediator.check(vm_id)
        on_outcome(outcome)
        return outcome

    return list(await asyncio.gather(*(one(v) for v in unique)))


def _targets(args: argparse.Namespace) -> tuple[list[VmId], str | None, VmFilter]:
    """What the caller named: VM ids (``check`` ids, ``--ids``), a computer name, or a filter."""
    texts = [*(getattr(args, "vm_id", None) or []), *(args.ids or [])]
    computer: str | None = getattr(args, "computer", None)
    try:
        vm_filter = VmFilter.from_options(
            resource_groups=getattr(args, "resource_group", []) or [],
            names=getattr(args, "name", []) or [],
            tags=getattr(args, "tag", []) or [],
        )
    except FilterError as error:
        raise UsageError(str(error)) from error
    if args.command == "check":
        if bool(texts) == (computer is not None):
            raise UsageError("check takes VM_ID or --computer NAME, one of them (VM_IDs may be several)")
        if computer is not None:
            try:
                resolve_query(computer)
            except ValueError as error:
                raise UsageError(f"--computer: {error}") from error
    elif texts and (not vm_filter.empty or args.subscription):
        # As az: --ids names the VMs exactly; the other options select from a listing.
        raise UsageError(
            "--ids names the VMs exactly: it takes no --subscription, --resource-group, --name or --tag"
        )
    named: list[VmId] = []
    for text in texts:
        try:
            named.append(VmId.parse(text))
        except InvalidVmId as error:
            raise UsageError(str(error)) from error
    return named, computer, vm_filter


def _retry_policy(args: argparse.Namespace) -> RetryPolicy:
    wait = args.retry_wait
    if wait is None:
        wait = max(args.sim_latency, 0.05) if args.simulate is not None else DEFAULT_FIRST_WAIT_S
    if wait < 0:
        raise UsageError("--retry-wait must not be negative")
    return RetryPolicy(first_wait_s=wait) if wait > 0 else RetryPolicy(retries=0)


def _say(line: str) -> None:
    print(f"avma-remediator: {line}", file=sys.stderr)


async def _ledger(settings: Settings, credential: AsyncTokenCredential) -> Ledger | None:
    """The app's ledger when the storage settings name it, else ``None``."""
    if not has_ledger(settings):
        return None
    try:
        return await open_ledger(settings, credential)
    except LedgerError as error:
        raise UsageError(f"the ledger (storage settings) cannot be used: {_one_line(str(error))}") from error


class _Scoped:
    """The workflow behind the scope check: a VM outside the scope ends ``skipped: out-of-scope``."""

    def __init__(self, remediator: Checker, scope: Scope) -> None:
        self._remediator, self._scope = remediator, scope

    async def check(self, vm_id: VmId, *, listed: VmFacts | None = None) -> Outcome:
        try:
            refused = await self._scope.check(vm_id)
        except InventoryError as error:  # scope that cannot be checked is not assumed
            return Outcome(
                str(vm_id),
                OutcomeKind.FAILED,
                "scope-unknown",
                hint=f"Not checked: cannot tell whether the VM is in scope: {_inventory_problem(error)}",
            )
        return refused or await self._remediator.check(vm_id, listed=listed)


def _inventory_problem(error: InventoryError) -> str:
    """One line for a failed Resource Graph lookup: the SDK's message spans several lines.

    An HTTP answer is named by its reason, status and code (the full text is logged with -v); a
    request that got no answer (DNS, TLS, connection) keeps its own text, flattened to one line.
    """
    if error.status is None:
        return f"Resource Graph unreachable: {_fit(' '.join(str(error).split()), 200)}"
    code = f" {error.code}" if error.code else ""
    return f"Resource Graph answered HTTP {error.status}{code} ({error.reason}); -v shows the full answer"


def _arm_problem(error: ComputeError) -> str:
    """One line for a failed ARM call, as ``_inventory_problem`` for Resource Graph: the SDK's
    message spans lines (``(Code) message``, then ``Code:`` and ``Message:``); -v logs it whole."""
    if error.status is None:
        return f"ARM unreachable: {_one_line(str(error))}"
    code = f" {error.code}" if error.code else ""
    return f"ARM answered HTTP {error.status}{code} ({error.reason}); -v shows the full answer"


def _one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, at most about ``limit`` characters, marked when cut.

    A line that is too long keeps its start and its end, where an SDK's message usually says what
    to do ("… run 'az login'"), and loses its middle: nothing is cut before its actionable part."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = _fit(lines[0] if lines else "", limit)
    return first + (" (-v shows the rest)" if len(lines) > 1 else "")


def _fit(text: str, limit: int) -> str:
    """``text`` within about ``limit`` characters: its head and its tail, joined by " … "."""
    if len(text) <= limit:
        return text
    head = max(limit * 2 // 5, 1)
    return text[:head].rstrip() + " … " + text[-(limit - head) :].lstrip()


class _FirstLine(logging.Formatter):
    """Without -v, a log record on stderr is one line: its first, the rest under -v."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return _one_line(self._inner.format(record), limit=500)


def _subscriptions(args: argparse.Namespace, settings: Settings) -> list[str]:
    given = list(getattr(args, "subscription", []) or [])
    if not given:
        return list(settings.subscriptions)
    in_scope = {s.lower() for s in settings.subscriptions}
    for sub in given:
        if not is_subscription_id(sub):
            raise UsageError(f"--subscription {sub!r} is not a subscription id (GUID)")
        if in_scope and not settings.management_group and sub.lower() not in in_scope:
            raise UsageError(f"--subscription {sub} is not in TARGET_SUBSCRIPTIONS (out of scope)")
    return given


def _print_report(report: SweepReport, output: str, mode: Mode) -> None:
    extra: dict[str, Any] = {"mode": mode.value}
    if report.listing_errors:
        extra["listingErrors"] = report.listing_errors
    if output == "json":
        print(as_json(report.outcomes, extra=extra))
    else:
        print(as_table(report.outcomes, mode=mode.value))
    for sub, text in report.listing_errors.items():
        print(f"avma-remediator: subscription {sub} could not be listed: {_one_line(text)}", file=sys.stderr)
        logging.getLogger(__name__).info("listing subscription %s: %s", sub, text)


class _Progress:
    """A progress line on stderr for long runs: rewritten in place on a terminal, else every 10 s.

    A wait before an in-run retry is shown at once (it is why nothing happens for a while)."""

    def __init__(self, stream: TextIO, *, every_s: float = 2.0) -> None:
        self._stream = stream
        self._outcomes: list[Outcome] = []
        self._started = self._last = time.monotonic()
        self._tty = stream.isatty()
        self._interval = every_s if self._tty else 10.0
        self._shown = False

    def outcome(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            counts = ", ".join(f"{k} {v}" for k, v in summary(self._outcomes).items())
            self._write(f"[{now - self._started:5.0f}s] {len(self._outcomes)} VMs done: {counts}")

    def waiting(self, wait: RetryWait) -> None:
        now = time.monotonic()
        self._last = now
        self._write(f"[{now - self._started:5.0f}s] {wait.describe()}")

    def _write(self, line: str) -> None:
        self._stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._tty and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


@contextlib.contextmanager
def _progress(stream: TextIO, *, every_s: float = 2.0) -> Iterator[_Progress]:
    progress = _Progress(stream, every_s=every_s)
    try:
        yield progress
    finally:
        progress.close()


def _simulated_env(values: Mapping[str, str]) -> dict[str, str | None]:
    """The simulator's settings, with ``AZURE_CLIENT_ID`` unset unless the simulator names one.

    The simulator checks ``client_id`` as the platform does; a client id left in the user's shell
    (for their own service principal) is not the simulated app's identity and must not leak in.
    """
    return {"AZURE_CLIENT_ID": None, **values}


@contextlib.contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Point this process (and azure-identity, which reads os.environ) at the simulator, then restore.

    A value of None unsets the variable for the duration.
    """
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _serve(args: argparse.Namespace) -> int:
    from simulator import Estate, EstateError, ServeError, serve_until_stopped

    for option, port in (("--arm-port", args.arm_port), ("--identity-port", args.identity_port)):
        if not 0 <= port <= 65535:
            raise UsageError(f"simulator serve: {option} {port}: a TCP port is 0-65535 (0: any free port)")
    if args.latency < 0:
        raise UsageError("simulator serve: --latency must not be negative")
    try:
        estate = Estate.load(Path(args.estate)) if args.estate else Estate.default()
    except (EstateError, OSError) as error:
        raise UsageError(f"estate file: {error}") from error
    if args.fault or args.fault_seed is not None:
        try:
            estate = estate.with_faults(estate.faults.with_options(args.fault, seed=args.fault_seed))
        except EstateError as error:
            raise UsageError(str(error)) from error

    def announce(env: Mapping[str, str]) -> None:
        print("# The simulator is running. Point the CLI or a Functions host at it with:")
        for key, value in _simulated_env(env).items():
            print(f"unset {key}" if value is None else f"export {key}={value}")
        if estate.faults.enabled:
            print(f"# Faults on: {json.dumps(estate.faults.to_dict(), separators=(',', ':'))}")
        print("# Ctrl-C (or SIGTERM) stops it.", flush=True)

    try:
        serve_until_stopped(
            estate,
            arm_port=args.arm_port,
            identity_port=args.identity_port,
            latency_s=args.latency,
            on_ready=announce,
        )
    except ServeError as error:
        raise UsageError(f"simulator serve: {error}") from error
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
