"""The automation that marks a flow run CRASHED when its heartbeats stop (pipelines/zombies.py).
It is installed on a real server and seen to act in tests/pipeline/test_team.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pipelines.zombies import AUTOMATION_NAME, HEARTBEAT_SECONDS, automation, main


def test_a_flow_run_silent_after_a_heartbeat_is_crashed():
    made = automation(90)
    trigger = made.trigger
    assert made.name == AUTOMATION_NAME
    assert trigger.posture.value == "Proactive" and trigger.within == timedelta(seconds=90)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert [a.state.value for a in made.actions] == ["CRASHED"]


@pytest.mark.parametrize("within", [HEARTBEAT_SECONDS, 10])
def test_a_window_of_one_heartbeat_or_less_is_refused(within, capsys):
    with pytest.raises(ValueError, match=f"within={within!r}: must be longer than one heartbeat"):
        automation(within)
    with pytest.raises(SystemExit):
        main(["--within", str(within)])
    assert "must be longer than one heartbeat" in capsys.readouterr().err
