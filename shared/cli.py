"""``avma-remediator``: audit first, ``--apply`` second, and a rehearsal on a simulated estate.

Exit codes: 0 nothing failed, 1 some VM failed (or a subscription could not be listed),
2 usage or configuration error.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from shared.azure.compute import ComputeError, ComputeGateway
from shared.azure.credentials import make_credential
from shared.azure.inventory import Inventory, InventoryError, resolve_query
from shared.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from shared.intake_cli import run_intake
from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId
from shared.report import as_json, as_table, summary
from shared.scope import Scope
from shared.settings import ConfigError, Mode, Settings, is_subscription_id
from shared.sweep import SweepReport, sweep
from shared.unreadable import check_until_readable
from shared.vm import VmFacts
from shared.workflow import Remediator

DEFAULT_SIM_LATENCY_S = 0.3


class UsageError(Exception):
    """Bad arguments or input files: exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avma-remediator",
        description="Find Windows VMs stuck on AVMA (0xC004FD02) and move them to the Azure KMS.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p_sweep = commands.add_parser("sweep", help="every Windows VM in the subscriptions in scope")
    p_sweep.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="ID",
        help="subscription to sweep (repeatable; default TARGET_SUBSCRIPTIONS, else all visible)",
    )
    run_options(p_sweep)

    p_check = commands.add_parser(
        "check", help="one VM, by ARM resource id, or the VMs a computer name (an alert's Computer) names"
    )
    p_check.add_argument("vm_id", nargs="?", metavar="VM_ID")
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
    except (ConfigError, UsageError) as error:
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
    vm_id: VmId | None = None
    computer: str | None = None
    if args.command == "check":
        computer = args.computer
        if (args.vm_id is None) == (computer is None):
            raise UsageError("check takes a VM_ID or --computer NAME (one of them)")
        if computer is not None:
            try:
                resolve_query(computer)
            except ValueError as error:
                raise UsageError(f"--computer: {error}") from error
        else:
            try:
                vm_id = VmId.parse(args.vm_id)
            except InvalidVmId as error:
                raise UsageError(str(error)) from error
    subs = _subscriptions(args, settings)

    credential = make_credential(settings, env)
    async with (
        credential,
        ComputeGateway(credential, settings) as gateway,
        Inventory(credential, settings) as scope_inventory,
    ):
        remediator = _Scoped(Remediator(gateway, settings), Scope.from_settings(settings, scope_inventory))
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
                outcomes = [
                    Outcome(
                        f"computer:{computer}",
                        OutcomeKind.SKIPPED,
                        "not-found",
                        details={"computer": computer},
                    )
                ]
            else:
                outcomes = [await check_until_readable(partial(remediator.check, f)) for f in found]
            report = SweepReport(outcomes=outcomes)
        elif vm_id is not None:
            outcomes = [await check_until_readable(partial(remediator.check, vm_id))]
            report = SweepReport(outcomes=outcomes)
        else:
            if not subs:
                try:
                    subs = await gateway.list_subscriptions()
                except ComputeError as error:
                    print(
                        f"avma-remediator: cannot list subscriptions: {_arm_problem(error)}", file=sys.stderr
                    )
                    logging.getLogger(__name__).info("ARM answered: %s", error)
                    return EXIT_FAILED
            with _progress(sys.stderr) as on_outcome:
                report = await sweep(
                    remediator,
                    gateway.list_vms,
                    subs,
                    concurrency=settings.max_concurrency,
                    on_outcome=on_outcome,
                )
    _print_report(report, args.output, settings.mode)
    failed = any(o.kind is OutcomeKind.FAILED for o in report.outcomes)
    return EXIT_FAILED if failed or report.listing_errors else EXIT_OK


class _Scoped:
    """The workflow behind the scope check: a VM outside the scope ends ``skipped: out-of-scope``."""

    def __init__(self, remediator: Remediator, scope: Scope) -> None:
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
        return f"Resource Graph unreachable: {' '.join(str(error).split())[:200]}"
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
    """The first non-empty line of ``text``, at most ``limit`` characters, marked when cut."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        return first[:limit] + " …"
    return first + (" (-v shows the rest)" if len(lines) > 1 else "")


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


@contextlib.contextmanager
def _progress(stream: TextIO, *, every_s: float = 2.0) -> Iterator[Any]:
    """A progress line on stderr for long runs: rewritten in place on a terminal, else every 10 s."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    last = [started]
    tty = stream.isatty()
    interval = every_s if tty else 10.0

    def on_outcome(outcome: Outcome) -> None:
        outcomes.append(outcome)
        now = time.monotonic()
        if now - last[0] >= interval:
            last[0] = now
            counts = ", ".join(f"{k} {v}" for k, v in summary(outcomes).items())
            line = f"[{now - started:5.0f}s] {len(outcomes)} VMs done: {counts}"
            stream.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            stream.flush()

    try:
        yield on_outcome
    finally:
        if tty and time.monotonic() - started >= interval:
            stream.write("\r\x1b[K")
            stream.flush()


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
    from simulator import Estate, EstateError, serve_forever

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
        print("# Ctrl-C stops it.", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_forever(
                estate,
                arm_port=args.arm_port,
                identity_port=args.identity_port,
                latency_s=args.latency,
                on_ready=announce,
            )
        )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
