"""The Simplex gate: every trigger, hysteresis, fail-safe behaviour and no_gate recording."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from robot_mbrl.hal.robot import BoxConstraint, Channel, Fault, Observation, RobotSpec
from robot_mbrl.planning.base import PlanInfo
from robot_mbrl.safety.fallback import FallbackConfig, make_fallback
from robot_mbrl.safety.gate import GateConfig, SafetyGate

SPEC = RobotSpec(
    obs=(
        Channel("x_m", "m", -0.5, 0.5),
        Channel("theta_rad", "rad", -math.pi, math.pi, angle=True),
        Channel("xdot_m_s", "m/s", -5.0, 5.0),
        Channel("thetadot_rad_s", "rad/s", -40.0, 40.0),
        Channel("u_applied", "1", -1.0, 1.0),
    ),
    act=(Channel("motor_u", "1", -1.0, 1.0),),
    control_hz=50.0,
    constraints=(BoxConstraint("track", "x_m", -0.35, 0.35),),
    safe_action=(0.0,),
)
THR = 1.0
MPC_ACTION = np.array([0.7])
OBS_VALUES = np.array([0.1, 0.2, 0.8, 0.0, 0.0])  # moving right: brake pushes left
K, E = 5, 4


def plan(action=MPC_ACTION, disagreement=0.1, margin=-0.2) -> PlanInfo:
    return PlanInfo(
        action=np.asarray(action, dtype=float),
        actions=torch.zeros(K, 1),
        predicted_obs=torch.zeros(K + 1, E, 5),
        disagreement=torch.full((K,), float(disagreement)),
        constraint_margins=torch.full((K, E, 1), float(margin)),
        value_tail=0.0,
        expected_return=1.0,
        truncated_at=None,
        solve_time_s=0.001,
    )


def obs(values=OBS_VALUES, stamp_s=10.0, faults=Fault.NONE) -> Observation:
    return Observation(np.asarray(values, dtype=float), stamp_s, faults)


def make_gate(fallback=None, monitor=None, **cfg) -> SafetyGate:
    cfg = {"disagreement_threshold": THR, "dwell_ticks": 5, "reentry_fraction": 0.5, **cfg}
    fb = fallback or make_fallback(FallbackConfig(kind="brake"), SPEC)
    return SafetyGate(SPEC, GateConfig(**cfg), fb, monitor)


def decide(gate, tick=0, time_s=10.0, o=None, p="default", err=None, late=False):
    return gate.decide(tick, time_s, o or obs(), plan() if p == "default" else p, err, late)


BRAKE_ACTION = make_fallback(FallbackConfig(kind="brake"), SPEC).act(OBS_VALUES)


def test_all_clear_passes_the_mpc_action():
    gate = make_gate()
    d = decide(gate)
    assert d.source == "mpc" and not d.switched and d.triggers == () and d.events == []
    np.testing.assert_array_equal(d.action, MPC_ACTION)
    assert BRAKE_ACTION[0] < 0  # the fallback differs from the MPC, so the tests can tell them apart


class _Alarm:
    def active_alarms(self):
        return [("cusum", 12.0, 8.0)]


TRIGGER_CASES = {
    "obs_nonfinite": dict(o=obs(values=[0.1, np.nan, 0.8, 0.0, 0.0])),
    "obs_out_of_range": dict(o=obs(values=[0.1, 0.2, 0.8, 99.0, 0.0])),
    "obs_stale": dict(o=obs(stamp_s=9.9)),
    "obs_fault": dict(o=obs(faults=Fault.SENSOR)),
    "plan_error": dict(p=None, err=RuntimeError("solver diverged")),
    "plan_missing": dict(p=None),
    "deadline_missed": dict(late=True),
    "plan_nonfinite": dict(p=plan(action=[np.nan])),
    "disagreement": dict(p=plan(disagreement=THR * 1.5)),
    "constraint": dict(p=plan(margin=0.01)),
    "monitor:cusum": dict(monitor=_Alarm()),
}


@pytest.mark.parametrize("name", list(TRIGGER_CASES))
def test_each_trigger_hands_control_to_the_fallback(name):
    case = dict(TRIGGER_CASES[name])
    gate = make_gate(monitor=case.pop("monitor", None))
    d = decide(gate, **case)
    assert name in [t.name for t in d.triggers]
    assert d.source == "fallback" and d.switched
    if name.startswith("obs_"):  # a reading the gate rejects is not one the fallback may act on
        expected = SPEC.stop_action()  # (nor is there a trusted one before it: the first tick)
    else:
        expected = make_fallback(FallbackConfig(kind="brake"), SPEC).act(OBS_VALUES)
    np.testing.assert_array_equal(d.action, expected)
    (event,) = d.events
    assert event["kind"] == "switch" and event["trigger"] == name and event["to"] == "fallback"
    assert event["applied"] == expected.tolist()
    json.dumps(event, allow_nan=False)  # events.jsonl stays strict JSON
    assert gate.switches == 1 and gate.fallback_ticks == 1 and gate.ticks == 1


def test_nan_observation_is_logged_and_the_fallback_acts():
    gate = make_gate()
    d = decide(gate, o=obs(values=[np.nan, 0.0, np.inf, 0.0, 0.0]))
    assert d.source == "fallback" and np.all(np.isfinite(d.action))
    (event,) = d.events
    assert event["trigger"] == "obs_nonfinite" and event["score"] == 2.0


def test_disagreement_at_threshold_is_not_a_trigger_but_above_is():
    assert decide(make_gate(), p=plan(disagreement=THR)).source == "mpc"
    assert decide(make_gate(), p=plan(disagreement=THR + 1e-6)).source == "fallback"


def test_constraint_margin_triggers_before_the_violation():
    gate = make_gate(constraint_margin=0.05)
    assert decide(gate, p=plan(margin=-0.03)).source == "fallback"
    assert decide(make_gate(constraint_margin=0.05), p=plan(margin=-0.06)).source == "mpc"


def test_hysteresis_holds_the_fallback_for_the_dwell_time():
    gate = make_gate(dwell_ticks=5, reentry_fraction=0.5)
    assert decide(gate, 0, p=plan(disagreement=2.0)).source == "fallback"
    # clear, disagreement below the re-entry threshold 0.5: four ticks are not enough
    for t in range(1, 5):
        d = decide(gate, t, p=plan(disagreement=0.1))
        assert d.source == "fallback" and d.triggers == () and not d.switched
    d = decide(gate, 5, p=plan(disagreement=0.1))
    assert d.source == "mpc" and d.switched
    (event,) = d.events
    assert event["kind"] == "switch" and event["trigger"] == "reentry" and event["to"] == "mpc"
    assert gate.switches == 2 and gate.fallback_ticks == 5


def test_reentry_needs_disagreement_below_the_lower_threshold():
    gate = make_gate(dwell_ticks=3, reentry_fraction=0.5)
    decide(gate, 0, p=plan(disagreement=2.0))
    # 0.7 is below the trigger threshold (1.0) but above re-entry (0.5): the fallback stays
    for t in range(1, 50):
        d = decide(gate, t, p=plan(disagreement=0.7))
        assert d.source == "fallback" and d.triggers == ()
    for t in range(50, 52):
        assert decide(gate, t, p=plan(disagreement=0.4)).source == "fallback"
    assert decide(gate, 52, p=plan(disagreement=0.4)).source == "mpc"


def test_a_trigger_during_the_dwell_restarts_it():
    gate = make_gate(dwell_ticks=3)
    decide(gate, 0, late=True)
    decide(gate, 1)
    decide(gate, 2)
    decide(gate, 3, late=True)  # restarts the count
    assert [decide(gate, t).source for t in range(4, 8)] == ["fallback", "fallback", "mpc", "mpc"]


def test_planner_exception_yields_the_fallback_not_a_crash():
    gate = make_gate()
    d = gate.decide(0, 10.0, obs(), None, ZeroDivisionError("boom"), False)
    assert d.source == "fallback"
    np.testing.assert_array_equal(d.action, BRAKE_ACTION)
    assert [t.name for t in d.triggers] == ["plan_error"]


class _Raises:
    spec = SPEC

    def act(self, obs_values):
        raise RuntimeError("fallback bug")


class _ReturnsNan:
    spec = SPEC

    def act(self, obs_values):
        return np.array([np.nan])


@pytest.mark.parametrize("fallback", [_Raises(), _ReturnsNan()], ids=["raises", "nan"])
def test_broken_fallback_yields_the_stop_action_and_a_gate_error(fallback):
    gate = make_gate(fallback=fallback)
    d = decide(gate, late=True)
    np.testing.assert_array_equal(d.action, SPEC.stop_action())
    assert d.source == "fallback" and d.events[0]["kind"] == "gate_error"
    json.dumps(d.events, allow_nan=False)
    assert gate.mode == "fallback" and gate.fallback_ticks == 1


def test_broken_monitor_or_plan_object_fails_closed():
    class BadMonitor:
        def active_alarms(self):
            raise KeyError("state lost")

    d = decide(make_gate(monitor=BadMonitor()))
    assert d.events[0]["kind"] == "gate_error"
    np.testing.assert_array_equal(d.action, SPEC.stop_action())
    d = decide(make_gate(), p=object())  # not a PlanInfo at all
    assert d.events[0]["kind"] == "gate_error" and d.events[0]["proposed"] is None


def test_uncalibrated_gate_never_trusts_the_mpc():
    gate = make_gate(disagreement_threshold=None)
    assert [decide(gate, t).source for t in range(20)] == ["fallback"] * 20
    gate.set_thresholds(disagreement=THR)
    assert [decide(gate, t).source for t in range(20, 26)][-1] == "mpc"
    with pytest.raises(ValueError):
        gate.set_thresholds(disagreement=math.nan)
    with pytest.raises(ValueError):
        gate.set_thresholds(ood=3.0)  # no monitor to hold it


def test_no_gate_passes_the_mpc_action_but_records_alarms():
    gate = make_gate(no_gate=True, dwell_ticks=2)
    sources, events = [], []
    for t, dis in enumerate([0.1, 2.0, 2.0, 0.1, 0.1, 0.1, 3.0]):
        d = decide(gate, t, p=plan(disagreement=dis))
        np.testing.assert_array_equal(d.action, MPC_ACTION)
        sources.append(d.source)
        events += d.events
    assert sources == ["mpc"] * 7
    assert [(e["tick"], e["kind"], e["trigger"]) for e in events] == [
        (1, "alarm", "disagreement"),
        (4, "clear", "reentry"),  # where the gate would have handed back to the MPC
        (6, "alarm", "disagreement"),
    ]
    assert events[0]["applied"] == MPC_ACTION.tolist() and gate.fallback_ticks == 0


def test_no_gate_never_writes_non_finite_values():
    gate = make_gate(no_gate=True)
    d = decide(gate, p=plan(action=[np.inf]))
    assert d.source == "fallback" and d.events[0]["kind"] == "alarm"  # not a gate_error
    np.testing.assert_array_equal(d.action, BRAKE_ACTION)
    d = decide(gate, 1, p=None, err=RuntimeError("x"))
    np.testing.assert_array_equal(d.action, BRAKE_ACTION)


def test_final_check_catches_a_non_finite_decision_from_any_path():
    from robot_mbrl.safety.gate import GateDecision

    gate = make_gate()

    def broken(*args):
        gate.ticks += 1  # a path that already counted the tick
        return GateDecision(np.array([np.nan]), "mpc", (), False, [])

    gate._decide = broken  # noqa: SLF001
    d = decide(gate)
    np.testing.assert_array_equal(d.action, SPEC.stop_action())
    assert d.events[0]["kind"] == "gate_error" and gate.ticks == 1 and gate.fallback_ticks == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("expected_return", float("nan")),  # V diverged: every candidate scored -inf, none chosen on merit
        ("value_tail", float("inf")),
        ("predicted_obs", torch.full((K + 1, E, 5), float("nan"))),
        ("actions", torch.full((K, 1), float("nan"))),
        ("disagreement", torch.zeros(0)),  # no step planned: malformed, not "no disagreement"
    ],
)
def test_any_non_finite_or_empty_plan_field_falls_back(field, value):
    p = plan()
    setattr(p, field, value)
    d = decide(make_gate(), p=p)
    assert d.source == "fallback" and d.events[0]["trigger"] == "plan_nonfinite"
    np.testing.assert_array_equal(d.action, BRAKE_ACTION)


@pytest.mark.parametrize(
    "bad",
    [
        obs(
            values=[0.9, 0.2, 4.9, 0.0, 0.0], faults=Fault.SENSOR
        ),  # a sensor fault: values not to be trusted
        obs(values=[0.1, 0.2, 0.8, 99.0, 0.0]),  # out of range: a glitch
        obs(values=[0.1, np.nan, 0.8, 0.0, 0.0]),
    ],
)
def test_the_fallback_acts_on_the_last_trusted_reading_then_stops(bad):
    """After a rejected reading the brake acts on the last trusted one while it is fresh (a one-tick
    glitch keeps braking sensibly), then commands the stop: a state-feedback law fed a glitched or
    frozen reading pushes with full force toward the wall it believes is the other one."""
    gate = make_gate(max_obs_age_s=0.05)
    brake = make_fallback(FallbackConfig(kind="brake"), SPEC)
    decide(gate, time_s=10.0, o=obs(stamp_s=10.0))  # trusted
    for t, want in (
        (10.02, brake.act(OBS_VALUES)),
        (10.04, brake.act(OBS_VALUES)),
        (10.06, SPEC.stop_action()),
    ):
        b = Observation(bad.values, t, bad.faults)
        d = decide(gate, time_s=t, o=b)
        assert d.source == "fallback"
        np.testing.assert_array_equal(d.action, want)


def test_an_end_stop_or_the_device_brake_leave_the_reading_usable():
    gate = make_gate()
    brake = make_fallback(FallbackConfig(kind="brake"), SPEC)
    at_the_stop = [0.44, 0.2, 0.8, 0.0, 0.0]
    d = decide(gate, o=obs(values=at_the_stop, faults=Fault.LIMIT | Fault.WATCHDOG))
    assert d.source == "fallback" and "obs_fault" in [t.name for t in d.triggers]
    np.testing.assert_array_equal(d.action, brake.act(np.asarray(at_the_stop)))  # pushed back from the stop


def test_a_reading_stamped_in_the_future_is_invalid():
    gate = make_gate(max_obs_age_s=0.05)
    for stamp in (10.5, np.inf):
        d = decide(gate, time_s=10.0, o=obs(stamp_s=stamp))
        assert "obs_stale" in [t.name for t in d.triggers] and d.source == "fallback"


def test_a_failing_fallback_still_counts_the_switch():
    class Broken:
        def act(self, x):
            return np.array([np.nan])

    gate = make_gate(fallback=Broken())
    d = decide(gate, p=plan(disagreement=THR * 1.5))
    assert d.source == "fallback" and d.switched and gate.switches == 1 and gate.mode == "fallback"
    np.testing.assert_array_equal(d.action, SPEC.stop_action())


def test_a_plan_without_constraint_margins_fails_closed():
    """A plan without margins for the robot's constraint turned the constraint trigger off (a
    planning task may add constraints of its own: more columns are fine)."""
    p = plan(margin=0.5)  # a violation predicted...
    p = PlanInfo(**{**p.__dict__, "constraint_margins": torch.zeros(K, E, 0)})  # ...but no margins column
    d = decide(make_gate(), p=p)
    assert d.source == "fallback" and [t.name for t in d.triggers] == ["plan_nonfinite"]


def test_a_reading_of_the_wrong_shape_is_invalid_even_with_the_right_size():
    d = decide(make_gate(), o=obs(OBS_VALUES.reshape(5, 1)))
    assert d.source == "fallback" and [t.name for t in d.triggers] == ["obs_shape"]


def test_a_plan_with_more_constraint_columns_than_the_robot_is_judged_on_them():
    """The planning task adds the stopping-distance shield to the robot's constraint (2 columns)."""
    p = plan()
    p = PlanInfo(**{**p.__dict__, "constraint_margins": torch.full((K, E, 2), -0.2)})
    assert decide(make_gate(), p=p).source == "mpc"
    p = PlanInfo(**{**p.__dict__, "constraint_margins": torch.cat([torch.full((K, E, 1), -0.2),
                                                                   torch.full((K, E, 1), 0.1)], -1)})  # fmt: skip
    assert [t.name for t in decide(make_gate(), p=p).triggers] == ["constraint"]
