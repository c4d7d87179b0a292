"""Review of issue 9's chaos proof (r9b): the one exemption of ``verdict_vs_state`` is no wider than
its reason.

``verdict_vs_state`` (bench/chaos.py) must fail when a licensed KMS client is recorded ``failed``,
save for a VM nothing could have looked at (its agent down from the start of the pass to its end,
by the estate): there the engine's ``failed: deadline-exceeded:agent-not-ready`` is the truth. The
check exempted such a VM whatever its ``failed`` said, so an engine that gave up on a down agent at
the first look (``failed: agent-not-ready``, transient made terminal, the very thing item 7 forbids)
passed it. Only a deadline reached after the item's retries is exempt now.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from bench import chaos
from shared.decide import Decision
from shared.model import OutcomeKind
from tests.test_chaos import BROKEN, shared_azurite

__all__ = ["shared_azurite"]


@pytest.fixture
def dead_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VM of the estate is a licensed KMS client whose agent is down for the whole run."""
    real = chaos.build_estate

    def build(config: chaos.ChaosConfig, count: int, seed: int) -> Any:
        estate = real(config, count, seed)
        return replace(estate, vms=tuple(replace(vm, agent_ready=False) for vm in estate.vms))

    monkeypatch.setattr(chaos, "build_estate", build)


DEAD = replace(BROKEN, vms=4, mix={"kms_healthy": 1.0}, dup_share=0.0)


@pytest.mark.slow
async def test_a_licensed_vm_nobody_could_look_at_is_exempt_only_at_its_deadline(
    dead_agents: None, shared_azurite: Any
) -> None:
    report = await chaos.run_chaos(DEAD, azurite=shared_azurite)
    enforce = report["passes"]["enforce"]
    assert report["violations"]["verdict_vs_state"] == 0, enforce["examples"]
    exempt = enforce["licensedUnobservable"]
    assert (
        list(exempt) == ["deadline-exceeded:agent-not-ready"]
        and exempt["deadline-exceeded:agent-not-ready"] >= 3
    )


@pytest.mark.slow
async def test_the_checks_catch_a_down_agent_made_terminal_at_the_first_look(
    dead_agents: None, shared_azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.workflow

    real_gate = shared.workflow.gate

    def terminal(vm: Any, settings: Any) -> Decision | None:
        decision = real_gate(vm, settings)
        if decision is not None and decision.reason == "agent-not-ready":
            return Decision.final(OutcomeKind.FAILED, "agent-not-ready")
        return decision

    monkeypatch.setattr(shared.workflow, "gate", terminal)
    report = await chaos.run_chaos(DEAD, azurite=shared_azurite)
    assert report["violations"]["verdict_vs_state"] >= 3  # each VM in scope (one subscription is not)
    assert report["passes"]["enforce"]["licensedUnobservable"] == {}
    [example, *_] = report["passes"]["enforce"]["examples"]["verdict_vs_state"]
    assert "a licensed KMS client, recorded failed: agent-not-ready" in example


# --- unrecorded_run_commands: does it fail when the intent is missing, or comes after the POST? ---

AVMA = replace(BROKEN, vms=6, dup_share=0.0)


@pytest.mark.slow
async def test_the_checks_catch_remediations_without_an_intent_row(
    shared_azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.ledger import Ledger

    async def no_intent(self: Ledger, *args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(Ledger, "record_intent", no_intent)
    report = await chaos.run_chaos(AVMA, azurite=shared_azurite)
    assert report["violations"]["unrecorded_run_commands"] > 0
    [example, *_] = report["passes"]["enforce"]["examples"]["unrecorded_run_commands"]
    assert "a remediation with no intent before it" in example


@pytest.mark.slow
async def test_the_checks_catch_an_intent_written_after_its_remediation(
    shared_azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intent row must precede the POST (a crash after it then leaves evidence): one written
    half a second after the Run Command started is a violation, judged by the simulator's start time
    (with a 1 s slack it passed)."""
    import asyncio

    from shared.ledger import Ledger

    real = Ledger.record_intent
    late: set[asyncio.Task[None]] = set()

    async def after_the_post(self: Ledger, *args: Any, **kwargs: Any) -> None:
        async def write() -> None:
            await asyncio.sleep(0.5)
            await real(self, *args, **kwargs)

        task = asyncio.create_task(write())
        late.add(task)
        task.add_done_callback(late.discard)

    monkeypatch.setattr(Ledger, "record_intent", after_the_post)
    report = await chaos.run_chaos(AVMA, azurite=shared_azurite)
    assert report["violations"]["unrecorded_run_commands"] > 0


@pytest.mark.slow
async def test_the_engine_as_it_is_writes_every_intent_before_its_remediation(shared_azurite: Any) -> None:
    report = await chaos.run_chaos(AVMA, azurite=shared_azurite)
    assert report["violations"]["unrecorded_run_commands"] == 0, report["passes"]["enforce"]["examples"]
    assert report["passes"]["enforce"]["remediatedVms"] > 0


# --- lost, from the producers' side: a delivery dropped while another copy reaches a verdict ------


@pytest.mark.slow
async def test_the_checks_catch_a_delivery_dropped_on_a_held_lease(
    shared_azurite: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9's first defect put back: a copy that meets another workflow's lease is dropped (no
    retry, no row). Every VM still ends with a verdict (the winning copy's), so only the count from
    the producers' side (each copy sent, each item produced, answered) can see it."""
    from shared.model import Outcome, OutcomeKind
    from shared.worker import Worker

    async def drop(self: Worker, item: Any, vm_id: Any, reason: str) -> Outcome:
        return Outcome(str(vm_id), OutcomeKind.SKIPPED, "duplicate")

    monkeypatch.setattr(Worker, "_wait_for_lease", drop)
    report = await chaos.run_chaos(replace(BROKEN, vms=6, latency_s=0.2), azurite=shared_azurite)
    assert report["violations"]["lost"] > 0
    examples = report["passes"]["enforce"]["examples"]["lost"]
    assert all("no outcome in the ledger" not in e and "last record is" not in e for e in examples), examples
