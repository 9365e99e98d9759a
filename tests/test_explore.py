"""The exploration shield: switches to the fallback before the stopping point leaves the safe zone,
logs every switch with the proposed and the applied action, and logging leaves the run unchanged."""

from __future__ import annotations

import numpy as np

from robot_mbrl.agents.explore import ShieldedExplorer
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_robot
from robot_mbrl.hal.robot import Observation
from robot_mbrl.runtime.loop import RateLoop, Tick
from robot_mbrl.safety.fallback import make_fallback

CFG = load_config(None, [])
SPEC = make_robot(CFG).spec
LOOP = RateLoop(50.0, paced=False)


def explorer(seed: int = 4) -> ShieldedExplorer:
    return ShieldedExplorer(SPEC, make_fallback(CFG.fallback, SPEC), CFG.explore, seed=seed, correlation=0.8)


def obs(x: float, xdot: float) -> Observation:
    values = np.zeros(len(SPEC.obs_names))
    values[SPEC.index("x_m")], values[SPEC.index("xdot_m_s")] = x, xdot
    values[SPEC.index("theta_rad")] = np.pi
    return Observation(values, stamp_s=0.0)


def tick(i: int) -> Tick:
    return Tick(i, i * 0.02, i * 0.02, (i + 1) * 0.02)


def test_switch_to_the_brake_is_logged_with_proposed_and_applied_action():
    ex = explorer()
    safe = ex.act(obs(0.0, 0.0), tick(0), LOOP)
    assert safe.source == "policy" and not safe.events
    # 0.25 m from centre at 1.5 m/s towards the end: the stopping point is past 0.35 - margin
    d = ex.act(obs(0.25, 1.5), tick(1), LOOP)
    assert d.source == "fallback" and d.action[0] < 0  # the brake pushes back
    (ev,) = d.events
    assert ev["kind"] == "switch" and ev["trigger"] == "explore_shield" and ev["to"] == "fallback"
    assert ev["score"] > 0 and ev["applied"] == d.action.tolist()
    assert len(ev["proposed"]) == len(d.action) and ev["proposed"] != ev["applied"]
    back = ex.act(obs(0.0, 0.0), tick(2), LOOP)
    (ev,) = back.events
    assert back.source == "policy" and ev["to"] == "explore" and ev["proposed"] == ev["applied"]


def test_invalid_observation_hands_over_to_the_fallback():
    d = explorer().act(obs(float("nan"), 0.0), tick(0), LOOP)
    assert d.source == "fallback" and np.isfinite(d.action).all()
    assert d.events[0]["trigger"] == "invalid_observation"


def test_logging_a_switch_leaves_the_exploration_sequence_unchanged():
    a, b = explorer(seed=9), explorer(seed=9)
    a.act(obs(0.0, 0.0), tick(0), LOOP)
    b.act(obs(0.0, 0.0), tick(0), LOOP)
    assert a.act(obs(0.3, 2.0), tick(1), LOOP).events  # a switches (and computes a proposal) ...
    after = a.act(obs(0.0, 0.0), tick(2), LOOP)  # ... and back: its second exploration action
    np.testing.assert_array_equal(after.action, b.act(obs(0.0, 0.0), tick(1), LOOP).action)


def test_the_logged_applied_action_is_what_the_robot_applied():
    """The shield asks for a full brake; the HAL's rate limit lets part of it through this tick:
    the event's `applied` is the robot's, `commanded` the shield's request."""
    import gc

    from robot_mbrl.factory import make_judge, make_task
    from robot_mbrl.runtime.episode import Decision, run_episode
    from robot_mbrl.runtime.rundir import Tally

    class Jump:  # full push one way, then a logged full push the other way
        def reset(self, obs):
            pass

        def observe(self, tr):
            return []

        frozen = True

        def act(self, obs, tick, loop):
            Jump.frozen &= gc.get_freeze_count() > 0
            u = np.array([1.0 if tick.index < 5 else -1.0])
            ev = [{"kind": "switch", "proposed": [0.0], "applied": u.tolist()}] if tick.index == 5 else []
            return Decision(u, events=ev)

    robot, task = make_robot(CFG), make_task(CFG)
    events: list[dict] = []
    with robot:
        run_episode(robot, make_judge(task, robot), Jump(), episode=0, max_steps=8, seed=0, paced=False,
                    tally=Tally(), on_event=events.append)  # fmt: skip
    (ev,) = events
    assert ev["commanded"] == [-1.0]
    assert Jump.frozen and gc.get_freeze_count() == 0  # ticks ran with the heap frozen (loop.frozen_heap)
    assert -1.0 < ev["applied"][0] < 1.0  # rate-limited on the way from +1 to -1


def test_a_misspelled_velocity_channel_is_an_error_not_a_missing_shield():
    import dataclasses

    import pytest

    from robot_mbrl.typedconfig import ConfigError

    bad = dataclasses.replace(CFG.explore, velocity_channels={"x_m": "xdot_ms"})
    with pytest.raises(ConfigError, match=r"explore.velocity_channels: expected names from .*'xdot_ms'"):
        ShieldedExplorer(SPEC, make_fallback(CFG.fallback, SPEC), bad, seed=0, correlation=0.0)


def test_a_velocity_mapping_that_leaves_a_constraint_out_is_an_error():
    import dataclasses

    import pytest

    from robot_mbrl.typedconfig import ConfigError

    for mapping in ({}, {"theta_rad": "thetadot_rad_s"}):  # the rail's x_m would go unshielded
        bad = dataclasses.replace(CFG.explore, velocity_channels=mapping)
        with pytest.raises(
            ConfigError, match=r"velocity channel for every constrained channel, got \['x_m'\]"
        ):
            ShieldedExplorer(SPEC, make_fallback(CFG.fallback, SPEC), bad, seed=0, correlation=0.0)


def test_a_reading_the_gate_would_reject_gets_no_random_action_and_no_push_from_it():
    """Out of range, stale or sensor-faulted: the shield takes over as the gate does, and the brake
    acts on the last trusted reading (fresh), else commands the stop — not on the rejected values."""
    from robot_mbrl.hal.robot import Fault

    brake = make_fallback(CFG.fallback, SPEC)
    spinning = obs(0.34, 0.0).values
    spinning[SPEC.index("thetadot_rad_s")] = 500.0  # out of range (a glitch)
    for bad in (Observation(spinning, 0.0), Observation(obs(0.34, 4.9).values, 0.0, Fault.SENSOR)):
        ex = explorer()
        d = ex.act(bad, tick(0), LOOP)  # nothing trusted before it
        assert d.source == "fallback" and d.events[0]["trigger"] == "invalid_observation"
        np.testing.assert_array_equal(d.action, SPEC.stop_action())
        ex.act(obs(-0.2, 0.0), tick(1), LOOP)  # trusted
        for i in (2, 3):  # 2 ticks (gate.max_obs_age_s at 50 Hz) on it, whatever the host's clock says:
            d = ex.act(Observation(bad.values, 5.0 * i, bad.faults), tick(i), LOOP)  # a lockstep run
            np.testing.assert_array_equal(d.action, brake.act(obs(-0.2, 0.0).values))  # must not depend on it
        d = ex.act(Observation(bad.values, 0.0, bad.faults), tick(4), LOOP)
        np.testing.assert_array_equal(d.action, SPEC.stop_action())
    paced = RateLoop(50.0, paced=True)
    d = explorer().act(Observation(obs(0.0, 0.0).values, paced.now() - 10.0), tick(0), paced)  # 10 s old
    assert d.source == "fallback" and d.events[0]["trigger"] == "invalid_observation"


def test_a_failing_fallback_gives_the_stop_action():
    class Broken:
        def act(self, x):
            raise RuntimeError("fallback broke")

    ex = ShieldedExplorer(SPEC, Broken(), CFG.explore, seed=0, correlation=0.0)
    d = ex.act(obs(0.25, 1.5), tick(0), LOOP)  # the shield hands over to the (broken) fallback
    assert d.source == "fallback"
    np.testing.assert_array_equal(d.action, SPEC.stop_action())


def test_the_planners_shield_uses_its_own_brake_model_and_the_explorer_keeps_its_own():
    """The default config: exploration brakes on 5 m/s^2 / 0.1 s, the planner and gate on 8 / 0.06
    (benchmarks/bench_brake.py). At 0.1 m doing 1.3 m/s outward the conservative model stops past
    0.35 - margin (0.399 m) and the planner's inside it (0.284 m)."""
    import dataclasses

    import torch

    from robot_mbrl.agents.planning_tasks import ShieldedTask
    from robot_mbrl.factory import make_task

    assert (CFG.explore.brake_decel_m_s2, CFG.explore.plan_brake_decel_m_s2) == (5.0, 8.0)
    state = obs(0.1, 1.3)
    assert explorer().act(state, tick(0), LOOP).source == "fallback"
    planned = ShieldedTask(make_task(CFG), SPEC, CFG.explore)
    assert float(planned.constraints(torch.as_tensor(state.values, dtype=torch.float32)).max()) <= 0
    same = dataclasses.replace(CFG.explore, plan_brake_decel_m_s2=None, plan_react_s=None)
    alike = ShieldedTask(make_task(CFG), SPEC, same)  # unset: the explorer's numbers
    assert float(alike.constraints(torch.as_tensor(state.values, dtype=torch.float32)).max()) > 0
