"""``avma-remediator``: audit first, ``--apply`` second, and a rehearsal on a simulated estate.

Exit codes (shared/exitcodes.py): 0 all done, 1 some VM failed (or a subscription could not be
listed), 2 usage, configuration or credential error, 3 some VM must be retried later, 130
interrupted. The wiring lives here; plans are shared/plan.py, output formats shared/output.py,
signals shared/interrupt.py, ``--from`` shared/resume.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.azure.compute import ComputeError, ComputeGateway
from shared.azure.credentials import make_credential
from shared.azure.inventory import Inventory, InventoryError, resolve_query
from shared.azure.network import NetworkGateway
from shared.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from shared.intake_cli import run_intake
from shared.interrupt import Interrupt, Interruptible
from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId
from shared.output import FORMATS, Progress, RunResult, render, result_document
from shared.plan import HookedChecker, Plan, PlanApplier, PlanError, Recorder, build_plan, confirm, load_plan
from shared.resume import DEFAULT_ONLY, ResumeError, parse_only, run_each, vms_to_resume
from shared.scope import Scope
from shared.settings import ConfigError, Mode, Settings, is_subscription_id
from shared.sweep import sweep
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, Remediator

DEFAULT_SIM_LATENCY_S = 0.3

EXIT_CODES_HELP = """\
exit codes:
  0    all done: every VM in scope was handled
  1    some VM failed (or a subscription could not be listed)
  2    usage, configuration or credential error: nothing was checked
  3    nothing failed, but some VM must be retried later
  130  interrupted (SIGINT or SIGTERM): the results so far were printed and written"""

MAIN_EPILOG = f"""\
examples:
  avma-remediator sweep --simulate                      rehearse an audit on the built-in estate
  avma-remediator sweep --out-plan plan.json            audit, and record the plan for review
  avma-remediator apply plan.json                       act on the reviewed plan (asks first)
  avma-remediator check <VM id>                         one VM, by its ARM resource id

{EXIT_CODES_HELP}
"""

SWEEP_EPILOG = f"""\
examples:
  avma-remediator sweep                                 audit every Windows VM in scope
  avma-remediator sweep --out-plan plan.json            the same, recording the plan for 'apply'
  avma-remediator sweep --apply                         audit, show the counts, ask, then remediate
  avma-remediator sweep --from result.json --apply      re-run the VMs that failed or were deferred
  avma-remediator sweep --simulate --output csv         rehearse on the simulator, as CSV

{EXIT_CODES_HELP}
"""

CHECK_EPILOG = f"""\
examples:
  avma-remediator check <VM id>                         audit one VM
  avma-remediator check <VM id> --apply --yes           remediate it without asking
  avma-remediator check --computer SRV01.corp.example   the VMs an alert's Computer names

{EXIT_CODES_HELP}
"""

APPLY_EPILOG = f"""\
examples:
  avma-remediator apply plan.json                       show the counts, ask, then act
  avma-remediator apply plan.json --yes --out result.json
  avma-remediator apply plan.json --simulate            on the simulator (no question without a terminal)

The plan must come from this cloud, scope and settings, and be at most 24 h old. Each VM is
detected again; it is changed only where the fresh facts lead to the plan's decision, otherwise it
ends 'skipped: plan-changed'.

{EXIT_CODES_HELP}
"""

SERVE_EPILOG = """\
examples:
  avma-remediator simulator serve                       the built-in estate, on free ports
  avma-remediator simulator serve estate.json --fault runCommandBusy=0.1
"""


class UsageError(Exception):
    """Bad arguments or input files: exit 2 with the message."""


def _version() -> str:
    try:
        return importlib.metadata.version("avma-remediator")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


VERBOSE_RUN = "-v: the tool's steps per VM with timings; -vv: the Azure SDK's HTTP logging too"
VERBOSE_OTHER = "-v: log details on stderr"


def _parser(
    commands: Any, name: str, *, help: str, epilog: str, level: int, verbose: str = VERBOSE_RUN
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _verbose(p, level, verbose)
    return p


def _verbose(p: argparse.ArgumentParser, level: int, text: str = VERBOSE_RUN) -> None:
    """-v on every parser level, each with its own count (a subparser's namespace overwrites its
    parent's values), so that ``-v sweep -v`` is -vv."""
    p.add_argument("-v", "--verbose", dest=f"verbose{level}", action="count", default=0, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avma-remediator",
        description="Find Windows VMs stuck on AVMA (0xC004FD02) and move them to the Azure KMS.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _verbose(parser, 0)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def output_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--output",
            choices=FORMATS,
            default="table",
            help="table (fits the terminal), json, tsv (as az: no header) or csv (RFC 4180); default table",
        )
        p.add_argument("--full-ids", action="store_true", help="table: full VM ids, which paste into check")
        p.add_argument(
            "--out",
            metavar="FILE",
            help="also write the JSON result to FILE (written on Ctrl-C too; --from reads it)",
        )

    def run_options(p: argparse.ArgumentParser, *, apply_flag: bool) -> None:
        if apply_flag:
            p.add_argument(
                "--apply", action="store_true", help="change VMs (default: audit, nothing changes)"
            )
        p.add_argument(
            "--yes",
            action="store_true",
            help="do not ask before changing VMs (needed without a terminal, except with --simulate)",
        )
        p.add_argument("--concurrency", type=int, metavar="N", help="VMs worked on at once (MAX_CONCURRENCY)")
        output_options(p)
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

    p_sweep = _parser(
        commands, "sweep", help="every Windows VM in the subscriptions in scope", epilog=SWEEP_EPILOG, level=1
    )
    p_sweep.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="ID",
        help="subscription to sweep (repeatable; default TARGET_SUBSCRIPTIONS, else all visible)",
    )
    p_sweep.add_argument(
        "--out-plan",
        metavar="FILE",
        help="write the audit's plan to FILE (each VM, its planned action, the facts and settings); "
        "act on it with 'apply FILE'",
    )
    p_sweep.add_argument(
        "--from",
        dest="from_result",
        metavar="RESULT_FILE",
        help="instead of listing: the VMs of a previous JSON result (--out, or --output json) "
        "whose outcome --only names",
    )
    p_sweep.add_argument(
        "--only",
        metavar="OUTCOMES",
        help="with --from: comma-separated outcomes to re-run (default failed,deferred)",
    )
    run_options(p_sweep, apply_flag=True)

    p_check = _parser(
        commands,
        "check",
        help="one VM, by ARM resource id, or the VMs a computer name (an alert's Computer) names",
        epilog=CHECK_EPILOG,
        level=1,
    )
    p_check.add_argument("vm_id", nargs="?", metavar="VM_ID")
    p_check.add_argument(
        "--computer",
        metavar="NAME",
        help="instead of VM_ID: the computer name of a log row or alert, resolved through Resource Graph "
        "(guest-reported name, osProfile name or VM name; an FQDN matches on its first label)",
    )
    run_options(p_check, apply_flag=True)

    p_apply = _parser(
        commands,
        "apply",
        help="act on a plan written by sweep --out-plan: only its VMs, only where nothing changed",
        epilog=APPLY_EPILOG,
        level=1,
    )
    p_apply.add_argument("plan", metavar="PLAN_FILE")
    run_options(p_apply, apply_flag=False)

    p_intake = _parser(
        commands,
        "intake",
        help="show the work items an Event Grid, alert or Log Analytics payload gives",
        epilog="example:\n  avma-remediator intake alert.json\n",
        level=1,
        verbose=VERBOSE_OTHER,
    )
    p_intake.add_argument("file", metavar="FILE|-", help="a JSON payload file, or - for standard input")

    p_sim = _parser(
        commands,
        "simulator",
        help="the simulated Azure estate",
        epilog=SERVE_EPILOG,
        level=1,
        verbose=VERBOSE_OTHER,
    )
    sim_commands = p_sim.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")
    p_serve = _parser(
        sim_commands,
        "serve",
        help="serve the simulator until interrupted",
        epilog=SERVE_EPILOG,
        level=2,
        verbose=VERBOSE_OTHER,
    )
    p_serve.add_argument("estate", nargs="?", default="", metavar="ESTATE_FILE")
    p_serve.add_argument(
        "--latency",
        type=float,
        default=DEFAULT_SIM_LATENCY_S,
        metavar="SECONDS",
        help=f"simulated Run Command duration (default {DEFAULT_SIM_LATENCY_S})",
    )
    p_serve.add_argument(
        "--arm-port", type=int, default=0, metavar="PORT", help="ARM's port (default: a free one)"
    )
    p_serve.add_argument(
        "--identity-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the token endpoint's port (default: a free one)",
    )
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


def verbosity(args: argparse.Namespace) -> int:
    return sum(int(getattr(args, f"verbose{level}", 0) or 0) for level in range(3))


def _configure_logging(level: int) -> dict[str, int]:
    """0: warnings, one line each; 1 (-v): the tool's own steps (shared.*), the SDK's warnings;
    2 (-vv): the SDK's HTTP logging too (azure-core's HttpLoggingPolicy logs at INFO). Gives the
    levels it changed, for main to restore (the CLI is also called in-process, by tests)."""
    logging.basicConfig(
        level=logging.INFO if level else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    names = ("azure", "shared.workflow", "shared.sweep")
    saved = {name: logging.getLogger(name).level for name in names}
    azure = logging.getLogger("azure")
    if level == 0:
        azure.setLevel(logging.ERROR)
        # The CLI names a subscription it could not list itself, in one line (_print_report).
        logging.getLogger("shared.sweep").setLevel(logging.CRITICAL)
        for handler in logging.getLogger().handlers:  # the one basicConfig made on stderr
            if getattr(handler, "stream", None) is sys.stderr and not isinstance(
                handler.formatter, _FirstLine
            ):
                handler.setFormatter(_FirstLine(handler.formatter))
        return saved
    logging.getLogger("shared.workflow").setLevel(logging.DEBUG)
    azure.setLevel(logging.INFO if level >= 2 else logging.WARNING)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    saved = _configure_logging(verbosity(args))
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
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def _applying(args: argparse.Namespace) -> bool:
    return args.command == "apply" or bool(getattr(args, "apply", False))


def _run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and not 1 <= args.concurrency <= 512:
        raise UsageError("--concurrency must be between 1 and 512")
    if args.sim_state_out and args.simulate is None:
        raise UsageError("--sim-state-out needs --simulate")
    if args.yes and not _applying(args):
        raise UsageError("--yes answers the question --apply asks; without --apply nothing changes")
    if getattr(args, "out_plan", None) and _applying(args):
        raise UsageError("--out-plan records an audit: run without --apply, review, then 'apply FILE'")
    if getattr(args, "only", None) and not getattr(args, "from_result", None):
        raise UsageError("--only goes with --from RESULT_FILE")
    if getattr(args, "from_result", None) and getattr(args, "subscription", None):
        raise UsageError("--from names the VMs itself: leave out --subscription")
    # The question before a change needs a person at a terminal; a script says --yes. The
    # simulator changes nothing real, so a rehearsal without a terminal goes ahead.
    interactive = sys.stdin.isatty()
    if _applying(args) and not args.yes and not interactive and args.simulate is None:
        raise UsageError(
            "changing VMs asks first, and there is no terminal to ask on: add --yes to go ahead "
            "(nothing was checked)"
        )
    ask = _applying(args) and not args.yes and interactive
    if args.simulate is None:
        return asyncio.run(_execute(args, dict(os.environ), ask=ask))

    from simulator import Estate, EstateError, Simulator

    try:
        estate = Estate.load(Path(args.simulate)) if args.simulate else Estate.default()
    except (EstateError, OSError) as error:
        raise UsageError(f"estate file: {error}") from error
    if args.sim_latency < 0:
        raise UsageError("--sim-latency must not be negative")
    with Simulator(estate, latency_s=args.sim_latency) as sim, _environ(_simulated_env(sim.env())):
        code = asyncio.run(_execute(args, dict(os.environ), simulated=True, ask=ask))
        if args.sim_state_out:
            Path(args.sim_state_out).write_text(json.dumps(sim.state_dump(), indent=2) + "\n")
        return code


@dataclass(frozen=True)
class _Targets:
    """What a run works on: VMs named up front, a computer name to resolve, or subscriptions to list."""

    ids: tuple[VmId, ...] | None = None
    computer: str | None = None
    subscriptions: tuple[str, ...] = ()


class _Early(Exception):
    """The run ends before any VM with this exit code; the message is already on stderr."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _targets(args: argparse.Namespace, settings: Settings) -> _Targets:
    if args.command == "check":
        computer = args.computer
        if (args.vm_id is None) == (computer is None):
            raise UsageError("check takes a VM_ID or --computer NAME (one of them)")
        if computer is not None:
            try:
                resolve_query(computer)
            except ValueError as error:
                raise UsageError(f"--computer: {error}") from error
            return _Targets(computer=computer)
        try:
            return _Targets(ids=(VmId.parse(args.vm_id),))
        except InvalidVmId as error:
            raise UsageError(str(error)) from error
    if getattr(args, "from_result", None):
        try:
            only = parse_only(args.only) if args.only else DEFAULT_ONLY
            return _Targets(ids=tuple(vms_to_resume(args.from_result, only)))
        except ResumeError as error:
            raise UsageError(str(error)) from error
    return _Targets(subscriptions=tuple(_subscriptions(args, settings)))


async def _execute(
    args: argparse.Namespace, env: Mapping[str, str], *, simulated: bool = False, ask: bool = False
) -> int:
    applying = _applying(args)
    base = Settings.from_env(env)
    if args.concurrency is not None:
        base = replace(base, max_concurrency=args.concurrency)
    audit, enforce = base.with_mode(Mode.AUDIT), base.with_mode(Mode.ENFORCE)
    settings = enforce if applying else audit
    plan: Plan | None = None
    if args.command == "apply":
        try:
            plan = load_plan(args.plan, base, simulated=simulated)
        except PlanError as error:
            raise UsageError(f"plan: {error}") from error
        targets = _Targets(ids=tuple(p.vm_id for p in plan.actionable))
    else:
        targets = _targets(args, settings)

    credential = make_credential(settings, env)
    async with (
        credential,
        ComputeGateway(credential, settings) as gateway,
        NetworkGateway(credential, settings) as network,
        Inventory(credential, settings) as scope_inventory,
    ):
        recorder = Recorder(gateway)
        scope = Scope.from_settings(settings, scope_inventory)
        run = _Run(args, gateway, credential, settings)
        with Interrupt(sys.stderr).installed() as interrupt:
            run.interrupt = interrupt
            try:
                if plan is not None:
                    if not plan.actionable:
                        print("avma-remediator: the plan has no VM to change", file=sys.stderr)
                    elif ask and not confirm(plan, stdin=sys.stdin, stderr=sys.stderr, what="apply"):
                        print("avma-remediator: not applied: nothing was changed", file=sys.stderr)
                        return EXIT_OK
                    applier = PlanApplier(
                        _Scoped(Remediator(recorder, enforce, network=network), scope), recorder, plan, base
                    )
                    result = await run.collect(targets, applier)
                elif applying and ask:
                    result = await _confirmed(
                        run, targets, recorder, scope, audit, enforce, simulated, network
                    )
                else:
                    result = await run.collect(
                        targets, _Scoped(Remediator(recorder, settings, network=network), scope)
                    )
                    if getattr(args, "out_plan", None):
                        stopped = result.interrupted
                        made = build_plan(
                            result.outcomes, recorder, settings, simulated=simulated, interrupted=stopped
                        )
                        made.write(args.out_plan)
            except _Early as early:
                return early.code
    _print_report(result, args)
    if result.interrupted:
        return EXIT_INTERRUPTED
    failed = any(o.kind is OutcomeKind.FAILED for o in result.outcomes)
    return EXIT_FAILED if failed or result.listing_errors else EXIT_OK


async def _confirmed(
    run: _Run,
    targets: _Targets,
    recorder: Recorder,
    scope: Scope,
    audit: Settings,
    enforce: Settings,
    simulated: bool,
    network: NetworkGateway | None = None,
) -> RunResult:
    """``--apply`` at a terminal: audit, show the counts by planned action, ask, then apply that plan."""
    found = await run.collect(targets, _Scoped(Remediator(recorder, audit, network=network), scope))
    plan = build_plan(found.outcomes, recorder, audit, simulated=simulated, interrupted=found.interrupted)
    if found.interrupted or not plan.actionable:
        return found
    if not confirm(plan, stdin=sys.stdin, stderr=sys.stderr, what="audit done"):
        print("avma-remediator: not applied: nothing was changed (the audit follows)", file=sys.stderr)
        return found
    applier = PlanApplier(
        _Scoped(Remediator(recorder, enforce, network=network), scope), recorder, plan, audit
    )
    applied = await run.collect(_Targets(ids=tuple(p.vm_id for p in plan.actionable)), applier)
    done = {VmId.try_parse(o.vm_id) for o in applied.outcomes}
    kept = [o for o in found.outcomes if VmId.try_parse(o.vm_id) not in done]
    if applied.interrupted:  # the VMs not reached keep their audit outcome, in an audit's words
        return RunResult(Mode.ENFORCE.value, [*kept, *applied.outcomes], found.listing_errors, True)
    return RunResult(Mode.ENFORCE.value, [*kept, *applied.outcomes], found.listing_errors)


class _Run:
    """One pass over the targets with the CLI's progress line and signal handling."""

    def __init__(
        self, args: argparse.Namespace, gateway: ComputeGateway, credential: Any, settings: Settings
    ) -> None:
        self._args, self._gateway, self._credential, self._settings = args, gateway, credential, settings
        self.interrupt = Interrupt(sys.stderr)

    async def collect(self, targets: _Targets, checker: HookedChecker) -> RunResult:
        settings, gateway = self._settings, self._gateway
        mode = Mode.ENFORCE.value if isinstance(checker, PlanApplier) else checker_mode(checker)
        outcomes: list[Outcome] = []
        listing_errors: dict[str, str] = {}
        wrapped = Interruptible(checker, self.interrupt)
        ids = targets.ids
        if targets.computer is not None:
            found = await self._resolve(targets.computer)
            if not found:
                missing = Outcome(
                    f"computer:{targets.computer}",
                    OutcomeKind.SKIPPED,
                    "not-found",
                    details={"computer": targets.computer},
                )
                return RunResult(mode, [missing])
            ids = tuple(found)
        progress = Progress(sys.stderr, total=len(ids) if ids is not None else None)

        def on_outcome(outcome: Outcome) -> None:
            outcomes.append(outcome)
            progress.on_outcome(outcome)

        try:
            if ids is not None:
                _, cut = await self.interrupt.run(
                    run_each(wrapped, ids, concurrency=settings.max_concurrency, on_outcome=on_outcome)
                )
            else:
                subs = list(targets.subscriptions) or await self._all_subscriptions()
                listing = _Listing(gateway, progress, listing_errors, len(subs))
                _, cut = await self.interrupt.run(
                    sweep(
                        wrapped,
                        listing.list_vms,
                        subs,
                        concurrency=settings.max_concurrency,
                        on_outcome=on_outcome,
                    )
                )
        finally:
            progress.close()
        interrupted = self.interrupt.requested.is_set()
        return RunResult(mode, [*outcomes, *cut], listing_errors, interrupted)

    async def _resolve(self, computer: str) -> list[VmId]:
        async with Inventory(self._credential, self._settings) as inventory:
            try:
                return list(await inventory.resolve_computer(computer))
            except InventoryError as error:
                print(
                    f"avma-remediator: cannot resolve {computer!r}: {_inventory_problem(error)}",
                    file=sys.stderr,
                )
                logging.getLogger(__name__).info("Resource Graph answered: %s", error)
                raise _Early(EXIT_FAILED) from error

    async def _all_subscriptions(self) -> list[str]:
        try:
            return await self._gateway.list_subscriptions()
        except ComputeError as error:
            print(f"avma-remediator: cannot list subscriptions: {_arm_problem(error)}", file=sys.stderr)
            logging.getLogger(__name__).info("ARM answered: %s", error)
            raise _Early(EXIT_FAILED) from error


def checker_mode(checker: HookedChecker) -> str:
    if isinstance(checker, _Scoped):
        return checker.settings.mode.value
    return Mode.AUDIT.value


class _Listing:
    """The gateway's listing, counted for the progress line, its failures kept for the report
    (also when a signal cuts the sweep short)."""

    def __init__(
        self, gateway: ComputeGateway, progress: Progress, errors: dict[str, str], subscriptions: int
    ) -> None:
        self._gateway, self._progress, self._errors = gateway, progress, errors
        self._left = subscriptions
        self._seen: set[VmId] = set()
        if subscriptions == 0:
            progress.listing_done()

    async def list_vms(self, subscription: str) -> AsyncIterator[VmFacts]:
        try:
            async for vm in self._gateway.list_vms(subscription):
                if vm.vm_id not in self._seen:
                    self._seen.add(vm.vm_id)
                    self._progress.listed()
                yield vm
        except ComputeError as error:
            self._errors[subscription] = f"{error.reason}: {error}"
            raise
        finally:
            self._left -= 1
            if self._left <= 0:
                self._progress.listing_done()


class _Scoped:
    """The workflow behind the scope check: a VM outside the scope ends ``skipped: out-of-scope``."""

    def __init__(self, remediator: Remediator, scope: Scope) -> None:
        self._remediator, self._scope = remediator, scope

    @property
    def settings(self) -> Settings:
        return self._remediator.settings

    async def check(
        self,
        vm_id: VmId,
        *,
        listed: VmFacts | None = None,
        before_run_command: BeforeRunCommand | None = None,
    ) -> Outcome:
        try:
            refused = await self._scope.check(vm_id)
        except InventoryError as error:  # scope that cannot be checked is not assumed
            return Outcome(
                str(vm_id),
                OutcomeKind.FAILED,
                "scope-unknown",
                hint=f"Not checked: cannot tell whether the VM is in scope: {_inventory_problem(error)}",
            )
        return refused or await self._remediator.check(
            vm_id, listed=listed, before_run_command=before_run_command
        )


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


def _print_report(result: RunResult, args: argparse.Namespace) -> None:
    """The result on stdout in the chosen format, the JSON result to ``--out``, and one line per
    subscription that could not be listed on stderr."""
    print(render(result, args.output, full_ids=args.full_ids))
    if args.out:
        Path(args.out).write_text(json.dumps(result_document(result), indent=2) + "\n", encoding="utf-8")
    for sub, text in result.listing_errors.items():
        print(f"avma-remediator: subscription {sub} could not be listed: {_one_line(text)}", file=sys.stderr)
        logging.getLogger(__name__).info("listing subscription %s: %s", sub, text)


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
