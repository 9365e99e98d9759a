"""Hardware-in-the-loop scenarios: the full host stack against the emulated cart-pole over a real pty.

One scenario = the twin (a :class:`TwinConfig` with a fault/shift schedule) served as a protocol-v1
device on a pty, a :class:`SerialRobot` over pyserial, a controller (by default a Simplex
:class:`SafetyGate` with the brake fallback around a simple proposer; any :class:`Controller` can
be handed in), the replay buffer, and :func:`run_episode` paced on the wall clock. Link faults
(corruption, dropped frames, stalls, unplug/replug) and host faults (a stalled host) are injected
at given ticks; sensor faults, actuator faults and dynamics shifts come from the twin's schedule,
whose ``at_s`` is counted from the first control tick. Everything the assertions need is collected
in a :class:`ScenarioResult`::

    res = run_scenario(Scenario("stall", ticks=150, injections=(Injection(60, "host_stall", 0.2),)))
    assert not res.commands_outside_limits()
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from robot_mbrl.data.buffer import ReplayBuffer
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.serial_robot import SerialRobot
from robot_mbrl.drivers.transport import make_transport
from robot_mbrl.hal.robot import Observation, RobotSpec, stop_on_signals
from robot_mbrl.hil.emulator import CommandRecord, McuEmulator, TwinPlant, serve
from robot_mbrl.hil.faults import FaultConfig
from robot_mbrl.planning.base import PlanInfo
from robot_mbrl.runtime.episode import Controller, Decision, EpisodeResult, TaskJudge, Transition, run_episode
from robot_mbrl.runtime.loop import LoopStats, RateLoop, Tick
from robot_mbrl.runtime.rundir import Tally
from robot_mbrl.safety.fallback import FallbackConfig, make_fallback
from robot_mbrl.safety.gate import GateConfig, SafetyGate
from robot_mbrl.sim.cartpole import CartpoleTwin
from robot_mbrl.sim.params import ScheduleEvent, TwinConfig
from robot_mbrl.tasks.cartpole import CartpoleTask

log = logging.getLogger(__name__)

LEAD_S = 0.3  # device time before the first control tick (schedule times are counted after it)


@dataclass(frozen=True)
class Injection:
    """A fault injected by the test harness at the start of host tick ``tick``.

    ``kind``: ``host_stall`` (the host sleeps ``arg`` s before writing), ``link_stall`` (the link
    freezes for ``arg`` s), ``unplug``, ``replug``, ``link_faults`` (set the link's
    :class:`FaultConfig` to ``config``), ``clean_link``.
    """

    tick: int
    kind: str
    arg: float = 0.0
    config: FaultConfig | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    ticks: int  # host control ticks (50 Hz on the default twin)
    schedule: tuple[ScheduleEvent, ...] = ()  # twin events; at_s counted from the first tick
    injections: tuple[Injection, ...] = ()
    proposer_gain: float = 1.0  # > 1: the proposer asks for commands beyond the limits
    watchdog_ms: int = 100
    task: str = "swingup"
    seed: int = 0


class RecordingPlant(TwinPlant):
    """The twin plant, noting (monotonic time) every device step that braked."""

    def __init__(self, twin: CartpoleTwin):
        super().__init__(twin)
        self.brake_times_s: list[float] = []

    def brake(self) -> None:
        self.brake_times_s.append(time.monotonic())
        super().brake()


class ProbedSerialRobot(SerialRobot):
    """A SerialRobot that keeps what it read and wrote (host monotonic time) for the assertions."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads: list[Observation] = []
        self.writes: list[tuple[float, np.ndarray]] = []  # (time sent, applied)

    def read(self) -> Observation:
        obs = super().read()
        self.reads.append(obs)
        return obs

    def write(self, action: np.ndarray) -> np.ndarray:
        applied = super().write(action)
        self.writes.append((time.monotonic(), applied.copy()))
        return applied


class SineProposer:
    """Stand-in for the MPC's proposal: a 1 Hz excitation with a weak centring term on the cart,
    scaled by ``gain`` (> 1 requests saturated commands). Returns a :class:`PlanInfo` with zero
    disagreement and the current constraint margins, so the gate judges it like a one-step plan."""

    def __init__(self, spec: RobotSpec, gain: float = 1.0, amplitude: float = 0.3, freq_hz: float = 1.0):
        self.spec, self.gain, self.amplitude, self.freq_hz = spec, gain, amplitude, freq_hz
        self._ix, self._iv = spec.index("x_m"), spec.index("xdot_m_s")

    def plan(self, obs_values: np.ndarray, tick: int) -> PlanInfo:
        t0 = time.perf_counter()
        v = np.nan_to_num(np.asarray(obs_values, dtype=float))
        phase = 2 * math.pi * self.freq_hz * tick / self.spec.control_hz
        u = self.amplitude * math.sin(phase) - 0.5 * v[self._ix] - 0.3 * v[self._iv]
        a = np.array([self.gain * u])
        g = self.spec.constraint_values(v).reshape(1, 1, -1)
        return PlanInfo(
            action=a,
            actions=torch.as_tensor(a).reshape(1, -1),
            predicted_obs=torch.as_tensor(np.stack([v, v])).reshape(2, 1, -1),
            disagreement=torch.zeros(1),
            constraint_margins=torch.as_tensor(g),
            value_tail=0.0,
            expected_return=0.0,
            truncated_at=None,
            solve_time_s=time.perf_counter() - t0,
        )


class GatedProposer:
    """Controller: every tick the Simplex gate decides between the proposer and the brake fallback."""

    def __init__(self, spec: RobotSpec, proposer: SineProposer, gate_cfg: GateConfig | None = None):
        cfg = gate_cfg or GateConfig(disagreement_threshold=1.0, dwell_ticks=5, max_obs_age_s=0.05)
        self.proposer = proposer
        self.gate = SafetyGate(spec, cfg, make_fallback(FallbackConfig(), spec))

    def reset(self, obs: Observation) -> None:
        self.gate.reset()

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        plan, err = None, None
        try:
            plan = self.proposer.plan(obs.values, tick.index)
        except Exception as e:  # noqa: BLE001 - a failing planner is a gate trigger, not a crash
            err = e
        d = self.gate.decide(tick.index, loop.now(), obs, plan, err, loop.late())
        return Decision(d.action, d.source, plan.solve_time_s if plan else None, d.events)

    def observe(self, transition: Transition) -> list[dict]:
        return []


@dataclass
class TickRecord:
    tick: int
    t_s: float  # host monotonic time the controller was asked
    obs: Observation
    source: str


class Probe:
    """Wraps the controller: injects this tick's faults, then records what the controller saw and chose."""

    def __init__(self, inner: Controller, emu: McuEmulator, injections: tuple[Injection, ...]):
        self.inner, self.emu = inner, emu
        self.injections: dict[int, list[Injection]] = {}
        for inj in injections:
            self.injections.setdefault(inj.tick, []).append(inj)
        self.ticks: list[TickRecord] = []
        self.injected_at: dict[str, list[float]] = {}  # kind -> host times it was injected
        self.loop: RateLoop | None = None

    def reset(self, obs: Observation) -> None:
        self.inner.reset(obs)

    def _inject(self, inj: Injection) -> None:
        log.info("inject %s (%s) at tick %d", inj.kind, inj.arg or inj.config or "", inj.tick)
        self.injected_at.setdefault(inj.kind, []).append(time.monotonic())
        link = self.emu.link
        if inj.kind == "host_stall":
            time.sleep(inj.arg)
        elif inj.kind == "link_stall":
            link.stall(inj.arg)
        elif inj.kind == "unplug":
            link.unplug()
        elif inj.kind == "replug":
            link.replug()
        elif inj.kind == "link_faults":
            link.set_config(inj.config or FaultConfig())
        elif inj.kind == "clean_link":
            link.set_config(FaultConfig())
        else:
            raise ValueError(f"unknown injection {inj.kind!r}")

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        self.loop = loop
        t = time.monotonic()
        decision = self.inner.act(obs, tick, loop)
        self.ticks.append(TickRecord(tick.index, t, obs, decision.source))
        for inj in self.injections.get(tick.index, ()):
            self._inject(inj)  # after deciding, before writing: a host stall delays this write
        return decision

    def observe(self, transition: Transition) -> list[dict]:
        return self.inner.observe(transition)


@dataclass
class ScenarioResult:
    scenario: Scenario
    spec: RobotSpec
    episode: EpisodeResult
    commands: list[CommandRecord]  # the device's log
    brake_times_s: list[float]  # device steps that braked (host monotonic clock)
    reads: list[Observation]
    writes: list[tuple[float, np.ndarray]]
    ticks: list[TickRecord]
    injected_at: dict[str, list[float]]
    buffer: ReplayBuffer
    link_stats: dict[str, int]
    device_crc_errors: int
    clamp_count: int
    twin_params: dict[str, float]
    loop_stats: LoopStats | None
    wall_s: float
    events: list[dict] = field(default_factory=list)

    # -- assertion helpers: each returns the offending items (empty = holds) -------------------
    def commands_outside_limits(self) -> list[str]:
        """Device-received commands outside the command limits or rate limits (the final safe-stop
        command is exempt from the rate limit: braking must not wait), or clamped by the device."""
        lo, hi = self.spec.act_low, self.spec.act_high
        step = np.asarray(self.spec.act_rate_per_s) * self.spec.dt_s
        bad = []
        for i, rec in enumerate(self.commands):
            v = np.asarray(rec.values)
            if not np.all(np.isfinite(v)) or np.any(v < lo - 1e-6) or np.any(v > hi + 1e-6):
                bad.append(f"seq {rec.seq}: {rec.values} outside [{lo}, {hi}]")
            if rec.applied != rec.values:
                bad.append(f"seq {rec.seq}: device clamped {rec.values} -> {rec.applied}")
            if 0 < i < len(self.commands) - 1:
                prev = self.commands[i - 1]
                n = (rec.seq - prev.seq) % (1 << 32) or 1
                if np.any(np.abs(v - np.asarray(prev.values)) > n * step + 1e-5):
                    bad.append(f"seq {prev.seq}->{rec.seq}: {prev.values} -> {rec.values} too fast")
        return bad

    def invalid_ticks_not_fallback(self) -> list[int]:
        """Ticks whose observation was invalid (fault bits, non-finite, out of range) yet the written
        action did not come from the fallback."""
        return [
            r.tick
            for r in self.ticks
            if not (r.obs.ok and self.spec.in_range(r.obs.values)) and r.source != "fallback"
        ]

    def invalid_ticks(self) -> list[int]:
        return [r.tick for r in self.ticks if not (r.obs.ok and self.spec.in_range(r.obs.values))]

    def vouched_keys(self) -> set[tuple]:
        """(stamp of s_t, s_t+1 as float32) of every valid transition the robot vouched for (both
        readings inside the spec's physical range: a sensor spike is not data), except the one
        closed after the last tick (its reading is taken after the loop ends)."""
        out = set()
        for prev, obs in zip(self.reads, self.reads[1:], strict=False):
            if obs.info.get("vouched") and self.spec.in_range(prev.values) and self.spec.in_range(obs.values):
                out.add((float(prev.stamp_s), tuple(np.asarray(obs.values, np.float32).tolist())))
        return out

    def buffer_keys(self) -> set[tuple]:
        a = self.buffer.arrays()
        return {(float(s), tuple(n.tolist())) for s, n in zip(a["stamp_s"], a["next_obs"], strict=True)}

    def vouched_missing_from_buffer(self) -> set[tuple]:
        return self.vouched_keys() - self.buffer_keys()

    def buffer_rows_not_finite(self) -> int:
        a = self.buffer.arrays()
        return int(np.sum(~np.isfinite(a["obs"]).all(1) | ~np.isfinite(a["next_obs"]).all(1)))

    def brake_latency_s(self, silence_at_s: float) -> float:
        """From the last command the host wrote before ``silence_at_s`` to the device's first brake
        after it (inf if it never braked)."""
        sent = [t for t, _ in self.writes if t <= silence_at_s]
        if not sent:
            return math.inf
        t_w = sent[-1]
        braked = [t for t in self.brake_times_s if t > t_w]
        return braked[0] - t_w if braked else math.inf


ControllerFactory = Callable[[RobotSpec, Scenario], Controller]


def default_controller(spec: RobotSpec, scenario: Scenario) -> Controller:
    return GatedProposer(spec, SineProposer(spec, gain=scenario.proposer_gain))


def _wait_device_time(twin: CartpoleTwin, t_s: float, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while twin.time_s < t_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"emulated device stuck at t={twin.time_s:.3f} s")
        time.sleep(0.002)


def run_scenario(
    scenario: Scenario, make_controller: ControllerFactory = default_controller
) -> ScenarioResult:
    """Run ``scenario`` on a fresh emulator and host stack; the emulator is stopped on every path."""
    schedule = tuple(dataclasses.replace(e, at_s=e.at_s + LEAD_S, clock="total") for e in scenario.schedule)
    twin = CartpoleTwin(TwinConfig(task=scenario.task, schedule=schedule), seed=scenario.seed)
    spec = twin.spec
    plant = RecordingPlant(twin)
    emu, port = serve(
        plant,
        "pty",
        sensor_limits=tuple((c.low, c.high) for c in spec.obs),
        actuator_limits=tuple((c.low, c.high) for c in spec.act),
        control_hz=spec.control_hz,
        faults=FaultConfig(),  # a FaultyLink with clean rates: stall/set_config available
        seed=scenario.seed,
    )
    try:
        cfg = SerialConfig(
            port=port, watchdog_ms=scenario.watchdog_ms, backoff_initial_s=0.02, backoff_max_s=0.1
        )
        robot = ProbedSerialRobot(spec, make_transport(cfg), cfg)
        buffer = ReplayBuffer(spec.obs_dim, spec.act_dim)
        probe = Probe(make_controller(spec, scenario), emu, scenario.injections)
        task = CartpoleTask(scenario.task, safe_x_m=twin.cfg.safe_x_m, end_stop_x_m=twin.cfg.end_stop_x_m)
        events: list[dict] = []

        def store(tr: Transition) -> None:
            buffer.add(
                tr.obs, tr.act, tr.reward, tr.next_obs, tr.terminated, tr.truncated, tr.stamp_s, tr.episode
            )

        t0 = time.monotonic()
        with stop_on_signals(robot):
            robot.activate()
            _wait_device_time(twin, LEAD_S)
            ep = run_episode(
                robot, TaskJudge(task), probe, episode=0, max_steps=scenario.ticks, seed=None,
                paced=True, tally=Tally(), on_transition=store, on_event=events.append,
            )  # fmt: skip
            emu.link.set_config(FaultConfig())  # let the safe stop through
        wall_s = time.monotonic() - t0
        _wait_until(
            lambda: bool(emu.command_log()) and emu.command_log()[-1].values == tuple(spec.stop_action())
        )
        return ScenarioResult(
            scenario=scenario,
            spec=spec,
            episode=ep,
            commands=emu.command_log(),
            brake_times_s=list(plant.brake_times_s),
            reads=robot.reads,
            writes=robot.writes,
            ticks=probe.ticks,
            injected_at=probe.injected_at,
            buffer=buffer,
            link_stats=robot.stats.as_dict(),
            device_crc_errors=emu.decoder.crc_errors,
            clamp_count=robot.clamp_count,
            twin_params=twin.truth().params,
            loop_stats=probe.loop.stats() if probe.loop else None,
            wall_s=wall_s,
            events=events,
        )
    finally:
        emu.stop()


def _wait_until(cond: Callable[[], bool], timeout_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
