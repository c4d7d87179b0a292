"""``avma-remediator``: audit first, ``--apply`` second, and a rehearsal on a simulated estate.

Exit codes (shared/exitcodes.py): 0 all done; 1 some VM failed, a VM you named does not exist, or a
subscription could not be listed; 2 usage, configuration or credential error (nothing was
checked); 3 nothing failed but some VM is still deferred after the run's own retries (run again
later); 130 interrupted. The wiring lives here; plans are shared/plan.py, output formats
shared/output.py, signals shared/interrupt.py, ``--from`` shared/resume.py, scope filters
shared/filters.py, the credential check shared/azure/credentials.py, the in-run retry
shared/inrun_retry.py, the app's ledger shared/cli_ledger.py.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential

from shared.azure.compute import ComputeError, ComputeGateway
from shared.azure.credentials import NoCredential, check_credential, make_credential
from shared.azure.inventory import Inventory, InventoryError, InventoryUnavailable, resolve_query
from shared.azure.network import NetworkGateway
from shared.cli_ledger import LedgeredCheck, WithoutLedger, cli_owner, correlation_id, has_ledger, open_ledger
from shared.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_exit_code
from shared.filters import FilterError, VmFilter
from shared.inrun_retry import DEFAULT_FIRST_WAIT_S, RetryPolicy, RetryWait, retry_deferred, still_deferred
from shared.intake_cli import run_intake
from shared.interrupt import Interrupt, Interruptible, terminate_as_interrupt
from shared.ledger import Ledger, LedgerError
from shared.model import InvalidVmId, Outcome, OutcomeKind, VmId
from shared.output import FORMATS, Progress, RunResult, render, result_document
from shared.plan import Plan, PlanApplier, PlanError, Recorder, build_plan, confirm, load_plan
from shared.resume import DEFAULT_ONLY, ResumeError, parse_only, run_each, vms_to_resume
from shared.scope import PerSubscription, Scope
from shared.settings import ConfigError, Mode, Settings, is_subscription_id
from shared.sweep import NOT_LISTED, sweep_inventory
from shared.unreadable import rechecking
from shared.vm import VmFacts
from shared.workflow import BeforeRunCommand, Checker, Remediator

DEFAULT_SIM_LATENCY_S = 0.3

EXIT_CODES_HELP = """\
exit codes:
  0    all done: every VM in scope was handled
  1    some VM failed, a VM you named does not exist, or a subscription could not be listed
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
  avma-remediator sweep -g rg-app --tag env=prod        only these VMs of the scope (as az)

{EXIT_CODES_HELP}
"""

CHECK_EPILOG = f"""\
examples:
  avma-remediator check <VM id>                         audit one VM
  avma-remediator check <VM id> --apply --yes           remediate it without asking
  avma-remediator check --computer SRV01.corp.example   the VMs an alert's Computer names
  avma-remediator check <VM id> <VM id> ...             several VMs (or --ids)

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
        p.add_argument(
            "--retry-wait",
            type=float,
            metavar="SECONDS",
            help="first wait before this run checks a busy or throttled VM again (then x3, 3 retries; "
            f"default {DEFAULT_FIRST_WAIT_S:g} s, with --simulate the simulated latency; 0: no retry)",
        )

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

    p_sweep = _parser(
        commands, "sweep", help="every Windows VM in the subscriptions in scope", epilog=SWEEP_EPILOG, level=1
    )
    p_sweep.add_argument(
        "--subscription",
        action="append",
        default=[],
        metavar="ID",
        help="subscription to sweep (repeatable; default MANAGEMENT_GROUP_ID's subscriptions, "
        "else TARGET_SUBSCRIPTIONS, else all visible)",
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
    run_options(p_sweep, apply_flag=True)

    p_check = _parser(
        commands,
        "check",
        help="VMs by ARM resource id, or the VMs a computer name (an alert's Computer) names",
        epilog=CHECK_EPILOG,
        level=1,
    )
    p_check.add_argument("vm_id", nargs="*", metavar="VM_ID")
    ids_option(p_check)
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
    p_serve.add_argument(
        "--throttle",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ARM's and Resource Graph's budgets (repeatable): model=tokenBucket|hourly|off, "
        "timeScale=N|auto, reads=SIZE/PER_SECOND, writes=perHour:N, resourceGraph=QUERIES/SECONDS|off; "
        "on top of the estate file's throttling (docs/simulator.md)",
    )
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
        with terminate_as_interrupt():
            return _run(args)
    except (ConfigError, UsageError, NoCredential) as error:
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
    if getattr(args, "from_result", None) and getattr(args, "ids", None):
        raise UsageError("--from names the VMs itself: leave out --ids")
    # The question before a change needs a person at a terminal; a script says --yes. The
    # simulator changes nothing real, so a rehearsal without a terminal goes ahead.
    interactive = sys.stdin is not None and sys.stdin.isatty()  # None: started with stdin closed
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
    vm_filter: VmFilter = field(default_factory=VmFilter)  # --resource-group/--name/--tag on a listing
    named: bool = False  # the caller named the VMs (check, --ids): one that does not exist is an error


class _Early(Exception):
    """The run ends before any VM with this exit code; the message is already on stderr."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _targets(args: argparse.Namespace, settings: Settings) -> _Targets:
    texts = [*(getattr(args, "vm_id", None) or []), *(getattr(args, "ids", None) or [])]
    try:
        vm_filter = VmFilter.from_options(
            resource_groups=getattr(args, "resource_group", None) or [],
            names=getattr(args, "name", None) or [],
            tags=getattr(args, "tag", None) or [],
        )
    except FilterError as error:
        raise UsageError(str(error)) from error
    if args.command == "check":
        computer = args.computer
        if bool(texts) == (computer is not None):
            raise UsageError("check takes VM_ID or --computer NAME, one of them (VM_IDs may be several)")
        if computer is not None:
            try:
                resolve_query(computer)
            except ValueError as error:
                raise UsageError(f"--computer: {error}") from error
            return _Targets(computer=computer, named=True)
        return _Targets(ids=_parse_ids(texts), named=True)
    if texts:
        if not vm_filter.empty or args.subscription:
            # As az: --ids names the VMs exactly; the other options select from a listing.
            raise UsageError(
                "--ids names the VMs exactly: it takes no --subscription, --resource-group, --name or --tag"
            )
        return _Targets(ids=_parse_ids(texts), named=True)
    if getattr(args, "from_result", None):
        if not vm_filter.empty:
            raise UsageError("--from names the VMs itself: leave out --resource-group, --name and --tag")
        try:
            only = parse_only(args.only) if args.only else DEFAULT_ONLY
            return _Targets(ids=tuple(vms_to_resume(args.from_result, only)))
        except ResumeError as error:
            raise UsageError(str(error)) from error
    return _Targets(subscriptions=tuple(_subscriptions(args, settings)), vm_filter=vm_filter)


def _parse_ids(texts: Sequence[str]) -> tuple[VmId, ...]:
    """VM ids as given, each once (``VmId`` compares as ARM does: an id given twice is one VM)."""
    try:
        return tuple(dict.fromkeys(VmId.parse(text) for text in texts))
    except InvalidVmId as error:
        raise UsageError(str(error)) from error


def _retry_policy(args: argparse.Namespace, simulated: bool) -> RetryPolicy:
    wait = args.retry_wait
    if wait is None:
        wait = max(args.sim_latency, 0.05) if simulated else DEFAULT_FIRST_WAIT_S
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


NOT_FOUND_HINT = (
    "No VM with this id exists (ARM answered 404): check its subscription, resource group and name."
)
NOT_FOUND_COMPUTER_HINT = (
    "No VM in scope carries this computer name (guest-reported name, osProfile name or VM name): "
    "check the name, and that the VM is in TARGET_SUBSCRIPTIONS or MANAGEMENT_GROUP_ID."
)


def _named_missing(outcomes: Sequence[Outcome], settings: Settings) -> tuple[list[Outcome], list[str]]:
    """Named VMs that do not exist: each gets a hint that says so and a line for stderr."""
    kept: list[Outcome] = []
    lines: list[str] = []
    for o in outcomes:
        if o.kind is OutcomeKind.SKIPPED and o.reason == "not-found":
            if o.vm_id.startswith("computer:"):
                computer = o.details.get("computer", o.vm_id.split(":", 1)[1])
                where = Scope.from_settings(settings).describe()
                lines.append(f"no VM in {where} has the computer name {computer!r}")
                o = replace(o, hint=o.hint or NOT_FOUND_COMPUTER_HINT)
            else:
                lines.append(f"VM {o.vm_id} does not exist (ARM answered 404)")
                o = replace(o, hint=o.hint or NOT_FOUND_HINT)
        kept.append(o)
    return kept, lines


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
    policy = _retry_policy(args, simulated)

    credential = make_credential(settings, env)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(credential)
        await check_credential(credential, settings, env)  # NoCredential: exit 2, before any VM
        gateway = await stack.enter_async_context(ComputeGateway(credential, settings))
        scope_inventory = await stack.enter_async_context(Inventory(credential, settings))
        await _check_group(scope_inventory, settings)  # MANAGEMENT_GROUP_ID: exit 2, before any VM
        network = await stack.enter_async_context(NetworkGateway(credential, settings))
        ledger = await _ledger(settings, credential)
        if ledger is not None:
            stack.push_async_callback(ledger.close)
        recorder = Recorder(gateway)
        scope = Scope.from_settings(settings, PerSubscription(scope_inventory))  # one query per subscription
        workflow = _Workflows(recorder, ledger, args.command, network)
        run = _Run(args, gateway, credential, settings, policy)
        with Interrupt(sys.stderr).installed() as interrupt:
            run.interrupt = interrupt
            try:
                if plan is not None:
                    if not plan.actionable:
                        print("avma-remediator: the plan has no VM to change", file=sys.stderr)
                    elif ask and not (answer := _ask(plan, interrupt, "apply")):
                        print("avma-remediator: not applied: nothing was changed", file=sys.stderr)
                        return EXIT_OK if answer is False else EXIT_INTERRUPTED
                    applier = PlanApplier(_Scoped(workflow.of(enforce), scope), recorder, plan, base)
                    result = await run.collect(targets, applier)
                elif applying and ask:
                    result = await _confirmed(
                        run, targets, recorder, workflow, scope, audit, enforce, simulated
                    )
                else:
                    result = await run.collect(targets, _Scoped(workflow.of(settings), scope))
                    if getattr(args, "out_plan", None):
                        stopped = result.interrupted
                        made = build_plan(
                            result.outcomes, recorder, settings, simulated=simulated, interrupted=stopped
                        )
                        made.write(args.out_plan)
            except _Early as early:
                return early.code
    missing: list[str] = []
    if targets.named:
        outcomes, missing = _named_missing(result.outcomes, settings)
        result = replace(result, outcomes=outcomes)
    _print_report(result, args)
    for line in missing:
        _say(line)
    if result.interrupted:
        return EXIT_INTERRUPTED
    deferred = still_deferred(result.outcomes)
    if deferred:
        _say(
            f"{deferred} VM{'s' if deferred != 1 else ''} still deferred: run again later "
            "(the hints say what to wait for)"
        )
    return run_exit_code(
        result.outcomes, listing_errors=bool(result.listing_errors), named_missing=bool(missing)
    )


async def _check_group(inventory: Inventory, settings: Settings) -> None:
    """``MANAGEMENT_GROUP_ID`` asked of Resource Graph once, before any VM (``group_subscriptions``).

    A group Resource Graph refuses (a 4xx: no such group, a display name instead of the id, or no
    read access) or in which it sees no subscription is a configuration error, said once with what
    to fix (exit 2), instead of a sweep that lists nothing, or a ``scope-unknown`` for each VM
    named. Throttled or unavailable: each VM's own scope check says so (nothing is assumed)."""
    group = settings.management_group
    if not group:
        return
    try:
        found = await inventory.group_subscriptions()
    except InventoryUnavailable as error:
        logging.getLogger(__name__).info("management group %s not checked up front: %s", group, error)
        return
    except InventoryError as error:
        logging.getLogger(__name__).info("Resource Graph answered: %s", error)
        # The service's own reason, first line (shared/azure/inventory.py puts its details first).
        said = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        what = (
            f"Resource Graph answered HTTP {error.status}: {_fit(said, 300).rstrip('.')}"
            if error.status is not None and said
            else _inventory_problem(error)
        )
        raise UsageError(f"MANAGEMENT_GROUP_ID={group}: {what}. {GROUP_HINT}") from error
    if not found:
        raise UsageError(
            f"MANAGEMENT_GROUP_ID={group}: Resource Graph sees no subscription in or under this "
            f"management group. {GROUP_HINT}"
        )


GROUP_HINT = (
    "Check that it is the group's id (not its display name) and that the credential can read it "
    "(Reader on the group); nothing was checked"
)


class _Workflows:
    """The per-VM workflow for a mode: on the app's ledger (its lease, its history) when the storage
    settings name one, else without it, said once when the first VM is reached."""

    def __init__(
        self, recorder: Recorder, ledger: Ledger | None, command: str, network: NetworkGateway | None = None
    ) -> None:
        self._recorder, self._ledger, self._network = recorder, ledger, network
        self._correlation = correlation_id(command)
        self._owner = cli_owner()
        self._said: list[str] = []

    def of(self, settings: Settings) -> LedgeredCheck | WithoutLedger:
        remediator = Remediator(self._recorder, settings, network=self._network)
        if self._ledger is not None:
            return LedgeredCheck(remediator, self._ledger, owner=self._owner, correlation=self._correlation)
        return WithoutLedger(remediator, self._say_once)

    def _say_once(self, line: str) -> None:
        if not self._said:  # an audit then an apply (--apply at a terminal) is still one run
            self._said.append(line)
            _say(line)


async def _confirmed(
    run: _Run,
    targets: _Targets,
    recorder: Recorder,
    workflow: _Workflows,
    scope: Scope,
    audit: Settings,
    enforce: Settings,
    simulated: bool,
) -> RunResult:
    """``--apply`` at a terminal: audit, show the counts by planned action, ask, then apply that plan."""
    found = await run.collect(targets, _Scoped(workflow.of(audit), scope))
    plan = build_plan(found.outcomes, recorder, audit, simulated=simulated, interrupted=found.interrupted)
    if found.interrupted or not plan.actionable:
        return found
    answer = _ask(plan, run.interrupt, "audit done")
    if not answer:
        print("avma-remediator: not applied: nothing was changed (the audit follows)", file=sys.stderr)
        return found if answer is False else replace(found, interrupted=True)
    applier = PlanApplier(_Scoped(workflow.of(enforce), scope), recorder, plan, audit)
    applied = await run.collect(_Targets(ids=tuple(p.vm_id for p in plan.actionable)), applier)
    done = {VmId.try_parse(o.vm_id) for o in applied.outcomes}
    kept = [o for o in found.outcomes if VmId.try_parse(o.vm_id) not in done]
    if applied.interrupted:  # the VMs not reached keep their audit outcome, in an audit's words
        return RunResult(Mode.ENFORCE.value, [*kept, *applied.outcomes], found.listing_errors, True)
    return RunResult(Mode.ENFORCE.value, [*kept, *applied.outcomes], found.listing_errors)


def _ask(plan: Plan, interrupt: Interrupt, what: str) -> bool | None:
    """``confirm`` at the terminal; None when Ctrl-C (or SIGTERM) came at the question, which
    answers no at once (the read blocks the loop, whose handlers would see the signal only after
    the answer: ``Interrupt.blocking``)."""
    try:
        with interrupt.blocking():
            return confirm(plan, stdin=sys.stdin, stderr=sys.stderr, what=what)
    except KeyboardInterrupt:
        print("\navma-remediator: interrupted at the question", file=sys.stderr)
        return None


class _Run:
    """One pass over the targets with the CLI's progress line and signal handling."""

    def __init__(
        self,
        args: argparse.Namespace,
        gateway: ComputeGateway,
        credential: Any,
        settings: Settings,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._args, self._gateway, self._credential, self._settings = args, gateway, credential, settings
        self._policy = policy or RetryPolicy(retries=0)
        self.interrupt = Interrupt(sys.stderr)

    async def collect(self, targets: _Targets, checker: Checker) -> RunResult:
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
                # One Resource Graph listing of the scope: --subscription, else MANAGEMENT_GROUP_ID,
                # else TARGET_SUBSCRIPTIONS, else everything the identity can read (the app's rule).
                scope = _listing_settings(settings, targets.subscriptions)
                async with Inventory(self._credential, scope) as inventory:
                    listing = _Listing(inventory, progress, listing_errors, targets.vm_filter)
                    _, cut = await self.interrupt.run(
                        sweep_inventory(
                            wrapped,
                            listing,
                            concurrency=settings.max_concurrency,
                            on_outcome=on_outcome,
                            limit=gateway.pacer.concurrency,
                        )
                    )
                if not targets.vm_filter.empty and not outcomes and not listing_errors:
                    _say(f"no VM in {listing.describe_scope()} matches {targets.vm_filter.describe()}")
            done = [*outcomes, *cut]
            if not self.interrupt.requested.is_set():
                # What was deferred for a reason worth asking again: asked again within the run.
                def waiting(wait: RetryWait) -> None:
                    progress.note(wait.describe())

                retried, _ = await self.interrupt.run(
                    retry_deferred(
                        done,
                        rechecking(wrapped, done),  # unreadable answers: the same bound, detect first
                        self._policy,
                        settings,
                        concurrency=settings.max_concurrency,
                        on_wait=waiting,
                    )
                )
                if retried is not None:
                    done = retried
        finally:
            progress.close()
        interrupted = self.interrupt.requested.is_set()
        return RunResult(mode, done, listing_errors, interrupted)

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


def checker_mode(checker: Checker) -> str:
    if isinstance(checker, _Scoped):
        return checker.settings.mode.value
    return Mode.AUDIT.value


class _Listing:
    """The inventory's listing of the scope, counted for the progress line, its failures kept for
    the report (also when a signal cuts the sweep short). A failed query is a failure of all it
    covered (shared/sweep.py): each of ``Inventory.listing_scope()`` is reported."""

    def __init__(
        self,
        inventory: Inventory,
        progress: Progress,
        errors: dict[str, str],
        vm_filter: VmFilter | None = None,
    ) -> None:
        self._inventory, self._progress, self._errors = inventory, progress, errors
        self._filter = vm_filter or VmFilter()
        self._seen: set[VmId] = set()

    def listing_scope(self) -> list[str]:
        return self._inventory.listing_scope()

    def describe_scope(self) -> str:
        return ", ".join(self._inventory.listing_scope()) or "the scope"

    async def unlisted_subscriptions(self) -> list[str]:
        try:
            unlisted = await self._inventory.unlisted_subscriptions()
        except InventoryError as error:
            self._failed(error)
            raise
        for sub in unlisted:
            self._errors[sub] = NOT_LISTED
        return unlisted

    async def list_vms(self) -> AsyncIterator[VmFacts]:
        try:
            async for vm in self._inventory.list_vms():
                if not self._filter.matches(vm.vm_id, vm.tags):
                    continue  # --resource-group/--name/--tag: a pure predicate on the listing
                if vm.vm_id not in self._seen:
                    self._seen.add(vm.vm_id)
                    self._progress.listed()
                yield vm
        except InventoryError as error:
            self._failed(error)
            raise
        finally:
            self._progress.listing_done()

    def _failed(self, error: InventoryError) -> None:
        self._progress.listing_done()
        for key in self._inventory.listing_scope():
            self._errors.setdefault(key, f"{error.reason}: {error}")


class _Scoped:
    """The workflow behind the scope check: a VM outside the scope ends ``skipped: out-of-scope``."""

    def __init__(self, remediator: LedgeredCheck | WithoutLedger | Remediator, scope: Scope) -> None:
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
        except InventoryUnavailable as error:
            # Resource Graph throttled or unavailable for now: nothing is known or done yet, so the
            # VM is deferred like any throttled one (retried within the run, else exit 3), never
            # assumed in scope and never a failure of the VM.
            details: dict[str, Any] = {"scope": self._scope.describe()}
            if error.retry_after_s is not None:
                details["retryAfterS"] = error.retry_after_s
            return Outcome(
                str(vm_id),
                OutcomeKind.DEFERRED,
                error.reason,
                hint=f"Not checked yet: cannot tell whether the VM is in scope: {_inventory_problem(error)}",
                details=details,
            )
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
    """The subscriptions ``--subscription`` names (validated against the configured scope); empty:
    the configured scope itself (MANAGEMENT_GROUP_ID, else TARGET_SUBSCRIPTIONS, else all visible)."""
    given = list(getattr(args, "subscription", []) or [])
    if not given:
        return []
    in_scope = {s.lower() for s in settings.subscriptions}
    for sub in given:
        if not is_subscription_id(sub):
            raise UsageError(f"--subscription {sub!r} is not a subscription id (GUID)")
        if in_scope and not settings.management_group and sub.lower() not in in_scope:
            raise UsageError(f"--subscription {sub} is not in TARGET_SUBSCRIPTIONS (out of scope)")
    return given


def _listing_settings(settings: Settings, subscriptions: Sequence[str]) -> Settings:
    """The scope of a sweep's listing: the ``--subscription`` ones when given (each VM still passes
    the configured scope's check), else the configured scope (``Inventory._scope``)."""
    if not subscriptions:
        return settings
    return replace(settings, subscriptions=tuple(subscriptions), management_group=None)


def _listing_subject(key: str) -> str:
    """What a listing error's key names, for the one line the CLI prints."""
    if key.startswith("managementGroups/"):
        return f"management group {key.removeprefix('managementGroups/')}"
    if key == "tenant":
        return "the subscriptions the identity can read"
    return f"subscription {key}"


def _print_report(result: RunResult, args: argparse.Namespace) -> None:
    """The result on stdout in the chosen format, the JSON result to ``--out``, and one line per
    subscription (or group, or tenant) that could not be listed on stderr."""
    text = render(result, args.output, full_ids=args.full_ids)
    if text:  # tsv of no VM is no line at all, as az prints it (not one empty line, an empty row)
        print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result_document(result), indent=2) + "\n", encoding="utf-8")
    for key, text in result.listing_errors.items():
        subject = _listing_subject(key)
        print(f"avma-remediator: {subject} could not be listed: {_one_line(text)}", file=sys.stderr)
        logging.getLogger(__name__).info("listing %s: %s", key, text)


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
    if args.throttle:
        try:
            estate = estate.with_throttling(estate.throttling.with_options(args.throttle))
        except EstateError as error:
            raise UsageError(str(error)) from error

    def announce(env: Mapping[str, str]) -> None:
        print("# The simulator is running. Point the CLI or a Functions host at it with:")
        for key, value in _simulated_env(env).items():
            print(f"unset {key}" if value is None else f"export {key}={value}")
        if estate.faults.enabled:
            print(f"# Faults on: {json.dumps(estate.faults.to_dict(), separators=(',', ':'))}")
        if not estate.throttling.is_default:
            print(f"# Throttling: {json.dumps(estate.throttling.to_dict(), separators=(',', ':'))}")
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
