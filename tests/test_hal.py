"""The HAL base class: clamping, non-finite commands, constraints, close always safe-stops."""

import numpy as np
import pytest

from robot_mbrl.hal import BoxConstraint, Channel, Fault, Observation, Robot, RobotSpec, stop_on_signals

SPEC = RobotSpec(
    obs=(Channel("x_m", "m", -1, 1), Channel("theta_rad", "rad", -np.pi, np.pi, angle=True)),
    act=(Channel("u", "1", -1, 1), Channel("v", "1", -2, 2)),
    control_hz=50.0,
    act_rate_per_s=(10.0, 1000.0),  # u may change by 0.2 per tick
    constraints=(BoxConstraint("track", "x_m", -0.5, 0.5),),
)


class Recorder(Robot):
    """The smallest backend: records what reached the 'device'."""

    def __init__(self):
        super().__init__(SPEC)
        self.sent, self.stops, self.disconnected = [], 0, False

    def _connect(self):
        pass

    def _disconnect(self):
        self.disconnected = True

    def _reset(self, seed):
        return Observation(np.zeros(2), 0.0)

    def _read(self):
        return Observation(np.zeros(2), 0.0)

    def _send(self, action):
        self.sent.append(action.copy())

    def _safe_stop(self):
        self.stops += 1


def test_write_clamps_to_limits_and_rate_and_reports_applied():
    r = Recorder().connect()
    r.reset()
    applied = r.write(np.array([5.0, -9.0]))
    assert applied.tolist() == pytest.approx([0.2, -2.0])  # rate limit from rest: 10/s * 20 ms; box
    applied = r.write(np.array([-1.0, 0.0]))
    assert applied[0] == pytest.approx(0.0)  # 0.2 - 0.2 per tick
    assert np.array_equal(r.sent[-1], applied)
    assert r.clamp_count == 2
    r.write(np.array([0.1, 0.0]))
    assert r.clamp_count == 2  # within limits: untouched


def test_non_finite_command_is_never_sent():
    r = Recorder().connect()
    r.reset()
    applied = r.write(np.array([np.nan, np.inf]))
    assert np.all(np.isfinite(applied)) and applied.tolist() == [0.0, 0.0]


def test_constraints_and_range():
    g = SPEC.constraint_values(np.array([[0.7, 0.0], [0.1, 0.0], [-0.6, 0.0]]))
    assert g[:, 0] == pytest.approx([0.2, -0.4, 0.1])
    assert SPEC.in_range([0.0, 0.0]) and not SPEC.in_range([0.0, np.nan]) and not SPEC.in_range([2.0, 0])


def test_close_safe_stops_on_exception():
    r = Recorder()
    with pytest.raises(RuntimeError):
        with stop_on_signals(r):
            r.write(np.array([0.5, 0.5]))
            raise RuntimeError("controller bug")
    assert r.stops == 1 and r.disconnected and not r.connected
    r.close()  # idempotent
    assert r.stops == 1


def test_context_manager_safe_stops_on_normal_exit():
    r = Recorder()
    with r:
        r.write(np.array([0.1, 0.1]))
    assert r.stops == 1


class Flaky(Recorder):
    """A link that can drop commands (``up`` False) and a device that can report its watchdog."""

    def __init__(self):
        super().__init__()
        self.up, self.faults = True, Fault.NONE

    def _read(self):
        return Observation(np.zeros(2), 0.0, self.faults)

    def _send(self, action):
        if not self.up:
            return False
        self.sent.append(action.copy())
        return True


def test_a_command_that_was_not_sent_is_not_reported_as_applied():
    r = Flaky().connect()
    r.reset()
    for _ in range(3):
        r.write(np.array([1.0, 0.0]))  # ramps 0.2, 0.4, 0.6
    r.up = False
    assert r.write(np.array([1.0, 0.0])).tolist() == SPEC.stop_action().tolist()  # dropped: the stop acts
    r.up = True
    assert r.write(np.array([1.0, 0.0]))[0] == pytest.approx(0.2)  # ramps from the stop, not from 0.8


@pytest.mark.parametrize("fault", [Fault.WATCHDOG, Fault.ESTOP, Fault.COMM])
def test_the_rate_limit_starts_from_the_stop_after_the_device_stopped_acting(fault):
    r = Flaky().connect()
    r.reset()
    for _ in range(4):
        r.write(np.array([1.0, 0.0]))  # at 0.8
    r.faults = fault  # the device braked on its watchdog (a host stall), or e-stopped, or the link
    r.read()
    r.faults = Fault.NONE
    r.read()
    assert r.write(np.array([1.0, 0.0]))[0] == pytest.approx(0.2)  # no jump from rest to 1.0
