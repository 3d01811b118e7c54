"""Mark a flow run CRASHED when its worker dies, so that its cell is retried elsewhere.

A worker on another machine can die without a word (power, OOM killer, a preempted cloud
instance): its flow runs stay RUNNING on the server for ever. Flow runs started from a
deployment send a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds
(the work pool's job variable; 30 in ``prefect.team.yaml``, the least Prefect allows).
This module creates the server-side automation Prefect documents for that case ("detect
zombie flows"): when a flow run's heartbeat is followed by nothing (another heartbeat or
a final state) within ``--within`` seconds, the run is set to CRASHED. The experiment
flow (:func:`pipelines.experiment_flow._wait`) then submits the cell again, and the
worker that takes it resumes from the checkpoint the dead one left in S3.

Once per server, idempotent (an automation of the same name is updated)::

    python -m pipelines.zombies --within 90

``--within`` must outlast a few heartbeats: a heartbeat is sent by the flow run's own
process, so one that is busy (a long ``torch.compile``, a stalled disk) may be a little
late. The default is three heartbeats of 30 s.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

#: the automation's name on the server (one per server)
AUTOMATION_NAME = "qimera: crash flow runs whose heartbeat stopped"
#: the heartbeat the team pool's flow runs send (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, seconds)
HEARTBEAT_SECONDS = 30
_FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                 "prefect.flow-run.Crashed")


def automation(within: float):
    """The automation (not yet on a server) that marks silent flow runs CRASHED."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if not within > HEARTBEAT_SECONDS:
        raise ValueError(f"within={within!r}: must be longer than one heartbeat ({HEARTBEAT_SECONDS} s)")
    return Automation(
        name=AUTOMATION_NAME,
        description=f"A flow run that sent no heartbeat and reached no final state for {within:g} s is CRASHED "
                    "(its worker died); qimera's experiment flow then submits its cell again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *_FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within:g} s: the worker running it is gone")],
    )


def install(within: float = 3 * HEARTBEAT_SECONDS):
    """Create the automation on the server ``PREFECT_API_URL`` names, or update the one of
    the same name; returns it."""
    from prefect.automations import Automation

    wanted = automation(within)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # none of that name yet
        return wanted.create()
    wanted.id = existing.id
    wanted.update()
    return wanted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.zombies", description=__doc__.split("\n\n")[0])
    p.add_argument("--within", type=float, default=3 * HEARTBEAT_SECONDS,
                   help=f"seconds without a heartbeat after which a flow run is CRASHED (default "
                        f"{3 * HEARTBEAT_SECONDS}; more than {HEARTBEAT_SECONDS})")
    args = p.parse_args(argv)
    try:
        made = install(args.within)
    except ValueError as exc:
        p.error(str(exc))
    print(f"automation {made.name!r} ({made.id}): a flow run silent for {args.within:g} s is marked CRASHED")


if __name__ == "__main__":
    main()
