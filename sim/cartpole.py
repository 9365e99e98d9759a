"""MuJoCo twin of a benchtop cart-pole, behind the same :class:`Robot` interface as the real rig.

What the controller sees is what the device would report, not simulator internals:

* positions come from encoders: Gaussian noise, then quantization to the encoder resolution;
* velocities are estimated on the device: finite differences of the quantized positions at the
  physics rate (``physics_dt_s``), through a first-order low-pass (``velocity_cutoff_hz``);
* a command written at control tick t acts from tick t + ``actuation_delay_ticks``; the motor force
  follows it through a first-order lag (``motor_tau_s``); ``u_applied`` reports the command acting
  on the motor now, which keeps the observation Markov for a one-tick delay;
* touching an end stop is a contact in MuJoCo; it sets ``Fault.LIMIT`` and counts ``end_stop_hits``.

Observation ``[x_m, theta_rad, xdot_m_s, thetadot_rad_s, u_applied]``; theta = 0 upright, wrapped
to (-pi, pi]. Action ``[motor_u]`` in [-1, 1]; force = max_force_n * u * schedule gain.

``write`` advances physics by exactly one control period (lockstep); the runtime loop paces wall
clock. The HIL emulator instead calls :meth:`CartpoleTwin.apply_command` and
:meth:`CartpoleTwin.advance` on wall-clock time.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import mujoco
import numpy as np

from robot_mbrl.hal.robot import BoxConstraint, Channel, Fault, Observation, Robot, RobotSpec
from robot_mbrl.sim.params import OBS_CHANNELS, TwinConfig
from robot_mbrl.sim.schedule import Schedule
from robot_mbrl.typedconfig import ConfigError

log = logging.getLogger(__name__)

_POLE_RADIUS_M = 0.006


def load_model() -> mujoco.MjModel:
    """Compile the packaged MJCF (``robot_mbrl.sim/models/cartpole.xml``)."""
    xml = importlib.resources.files("robot_mbrl.sim").joinpath("models/cartpole.xml").read_text()
    return mujoco.MjModel.from_xml_string(xml)


def apply_params(model: mujoco.MjModel, p: dict[str, float], cfg: TwinConfig) -> None:
    """Write physical parameters ``p`` (SCHEDULABLE_PARAMS names) and the rig geometry into ``model``."""
    cart = model.body("cart").id
    pole = model.body("pole").id
    slider, hinge = model.joint("slider"), model.joint("hinge")
    m, length = p["pole_mass_kg"], p["pole_length_m"]
    model.body_mass[cart] = p["cart_mass_kg"]
    model.body_mass[pole] = m
    model.body_ipos[pole] = (0.0, 0.0, length / 2)  # uniform rod, pivot at its end
    i_perp = m * length**2 / 12.0
    model.body_inertia[pole] = (i_perp, i_perp, 0.5 * m * _POLE_RADIUS_M**2)
    g = model.geom("pole").id
    model.geom_size[g] = (_POLE_RADIUS_M, length / 2, 0.0)
    model.geom_pos[g] = (0.0, 0.0, length / 2)
    model.geom_rbound[g] = length / 2 + _POLE_RADIUS_M
    model.dof_damping[slider.dofadr[0]] = p["rail_viscous_n_s_m"]
    model.dof_frictionloss[slider.dofadr[0]] = p["rail_coulomb_n"]
    model.dof_damping[hinge.dofadr[0]] = p["hinge_damping_nm_s_rad"]
    model.dof_frictionloss[hinge.dofadr[0]] = p["hinge_coulomb_nm"]
    motor = model.actuator("motor").id
    model.actuator_gainprm[motor, 0] = p["max_force_n"]
    model.actuator_dynprm[motor, 0] = p["motor_tau_s"]
    model.opt.gravity[:] = (0.0, 0.0, -p["gravity_m_s2"])
    model.opt.timestep = cfg.physics_dt_s
    # the bumpers' inner faces sit where the cart centre is at +-end_stop_x_m
    cart_half_m = model.geom_size[model.geom("cart").id, 0]
    for name, sign in (("stop_left", -1.0), ("stop_right", 1.0)):
        sg = model.geom(name).id
        model.geom_pos[sg, 0] = sign * (cfg.end_stop_x_m + cart_half_m + model.geom_size[sg, 0])
    model.jnt_range[slider.id] = (-cfg.rail_half_length_m, cfg.rail_half_length_m)
    mujoco.mj_setConst(model, mujoco.MjData(model))  # scratch data: keep the live state untouched


def make_spec(cfg: TwinConfig) -> RobotSpec:
    rail, pi = cfg.rail_half_length_m, math.pi
    return RobotSpec(
        obs=(
            Channel("x_m", "m", -rail, rail),
            Channel("theta_rad", "rad", -pi, pi, angle=True),
            Channel("xdot_m_s", "m/s", -cfg.xdot_range_m_s, cfg.xdot_range_m_s),
            Channel("thetadot_rad_s", "rad/s", -cfg.thetadot_range_rad_s, cfg.thetadot_range_rad_s),
            Channel("u_applied", "1", -1.0, 1.0),
        ),
        act=(Channel("motor_u", "1", -1.0, 1.0),),
        control_hz=cfg.control_hz,
        act_rate_per_s=(cfg.act_rate_per_s,),
        constraints=(BoxConstraint("track_limit", "x_m", -cfg.safe_x_m, cfg.safe_x_m),),
        safe_action=(0.0,),
    )


def wrap_angle(theta_rad: float) -> float:
    """Wrap to (-pi, pi]."""
    w = math.remainder(theta_rad, 2 * math.pi)
    return w + 2 * math.pi if w <= -math.pi else w


def _quantize(value: float, step: float) -> float:
    """Nearest multiple of ``step`` (an encoder count); exact when ``step`` is 0. Python floats only."""
    return step * math.floor(value / step + 0.5) if step > 0 else value


@dataclass(frozen=True)
class TwinTruth:
    """Simulator ground truth. For tests and measurement ONLY: the learning stack must never use it."""

    state: np.ndarray  # [x_m, theta_rad (wrapped), xdot_m_s, thetadot_rad_s], shape (4,)
    force_n: float  # motor force acting on the cart now
    u_acting: float  # normalized command acting on the motor now
    actuator_gain: float  # schedule gain (negative after a sign flip)
    params: dict[str, float]  # physical parameters in effect now
    time_s: float  # simulated time since creation
    episode_time_s: float  # simulated time since the last reset
    in_contact: bool  # cart touching an end stop now
    end_stop_hits: int


class CartpoleTwin(Robot):
    """The cart-pole twin. ``seed`` seeds initial states and sensor noise; ``reset(seed)`` reseeds."""

    def __init__(self, cfg: TwinConfig, seed: int = 0):
        cfg.validate()
        super().__init__(make_spec(cfg))
        self.cfg = cfg
        self.model = load_model()
        self.data = mujoco.MjData(self.model)
        self._schedule = Schedule(cfg.schedule)
        self._base_params = cfg.physical_params()
        self._params: dict[str, float] = {}
        self._gain = 1.0
        self._stop_geoms = np.array([self.model.geom("stop_left").id, self.model.geom("stop_right").id])
        self._delay_steps = cfg.actuation_delay_ticks * cfg.substeps
        self._alpha = 1.0 - math.exp(-2 * math.pi * cfg.velocity_cutoff_hz * cfg.physics_dt_s)
        self._theta_step = (
            2 * math.pi / cfg.pole_encoder_counts_per_rev if cfg.pole_encoder_counts_per_rev else 0.0
        )
        self._rng = np.random.default_rng(seed)
        self._total_steps = 0  # physics steps since creation
        self._episode_steps = 0  # physics steps since the last reset
        self._pending: deque[tuple[int, float]] = deque()  # (physics step it acts from, u)
        self._u_acting = 0.0
        self._enc = [0.0, 0.0]  # device's quantized [x_m, theta_rad (unwrapped)]
        self._vel = [0.0, 0.0]  # device's filtered [xdot_m_s, thetadot_rad_s]
        self._in_contact = False
        self._limit_latched = False  # an end-stop contact happened since the last command
        self.end_stop_hits = 0
        self._advance_debt_s = 0.0
        self._wall_anchor_s = time.monotonic()
        self._reset(seed)

    # -- clocks and effects ----------------------------------------------------------------------
    @property
    def time_s(self) -> float:
        """Simulated seconds since the twin was created (the schedule's total clock)."""
        return self._total_steps * self.cfg.physics_dt_s

    @property
    def episode_time_s(self) -> float:
        """Simulated seconds since the last reset (the schedule's episode clock)."""
        return self._episode_steps * self.cfg.physics_dt_s

    def _update_effects(self) -> None:
        t_ep, t_tot = self.episode_time_s, self.time_s
        params = self._schedule.params(self._base_params, t_ep, t_tot)
        if params != self._params:
            apply_params(self.model, params, self.cfg)
            if self._params:
                log.info("twin parameters changed at t=%.3f s: %s", t_ep, params)
            self._params = params
        self._gain = self._schedule.actuator_gain(t_ep, t_tot)
        self._schedule.log_param_transitions(t_ep, t_tot)

    # -- device side -----------------------------------------------------------------------------
    def apply_command(self, u: float) -> None:
        """Hand the motor a normalized command; it acts ``actuation_delay_ticks`` control periods later.

        No rate limiting here (``write`` does that); non-finite becomes 0, the value is clipped to
        [-1, 1]. Used by ``write`` and by the HIL emulator.
        """
        u = float(u)
        u = min(max(u, -1.0), 1.0) if math.isfinite(u) else 0.0
        self._pending.append((self._total_steps + self._delay_steps, u))
        self._limit_latched = self._in_contact
        self._activate_due()

    def _activate_due(self) -> None:
        while self._pending and self._pending[0][0] <= self._total_steps:
            self._u_acting = self._pending.popleft()[1]

    def advance(self, duration_s: float) -> None:
        """Step physics for ``duration_s`` seconds with the current command (leftover < dt carries over).

        The schedule is evaluated at least once per control period.
        """
        if duration_s < 0:
            raise ValueError(f"advance: duration_s must be >= 0, got {duration_s}")
        self._advance_debt_s += duration_s
        n = int(self._advance_debt_s / self.cfg.physics_dt_s + 1e-9)
        self._advance_debt_s = max(0.0, self._advance_debt_s - n * self.cfg.physics_dt_s)
        self._run(n)

    def _run(self, n_steps: int) -> None:
        while n_steps > 0:
            chunk = min(n_steps, self.cfg.substeps)
            self._update_effects()
            self._step_physics(chunk)
            n_steps -= chunk

    def _step_physics(self, n: int) -> None:
        """``n`` MuJoCo steps; the device samples its encoders after each one."""
        noise = self._rng.standard_normal((n, 2)) * (self.cfg.cart_noise_std_m, self.cfg.pole_noise_std_rad)
        m, d, dt, alpha = self.model, self.data, self.cfg.physics_dt_s, self._alpha
        qpos, ctrl, x_step, th_step = d.qpos, d.ctrl, self.cfg.cart_encoder_m, self._theta_step
        for nx, nth in noise.tolist():
            self._activate_due()
            ctrl[0] = self._u_acting * self._gain
            mujoco.mj_step(m, d)
            self._total_steps += 1
            self._episode_steps += 1
            contact = d.ncon > 0 and bool(
                np.isin(d.contact.geom1, self._stop_geoms).any()
                or np.isin(d.contact.geom2, self._stop_geoms).any()
            )
            if contact:
                self.end_stop_hits += not self._in_contact
                self._limit_latched = True
            self._in_contact = contact
            px, pth = qpos.tolist()
            x = _quantize(px + nx, x_step)
            th = _quantize(pth + nth, th_step)
            self._vel[0] += alpha * ((x - self._enc[0]) / dt - self._vel[0])
            self._vel[1] += alpha * ((th - self._enc[1]) / dt - self._vel[1])
            self._enc = [x, th]
        if d.warning[mujoco.mjtWarning.mjWARN_BADQACC].number:  # MuJoCo reset the state: the run is void
            raise ConfigError(
                "config", "twin", "physical parameters MuJoCo can simulate stably",
                f"an unstable simulation (non-finite or huge accelerations after {self._total_steps} steps): "
                "check the masses, lengths and forces",
            )  # fmt: skip
        self._activate_due()

    # -- Robot hooks -----------------------------------------------------------------------------
    def _connect(self) -> None:
        self._wall_anchor_s = time.monotonic() - self.time_s

    def _disconnect(self) -> None:
        log.debug("twin disconnected after %.3f s simulated", self.time_s)

    def _reset(self, seed: int | None) -> Observation:
        """Draw the task's initial state (swingup: hanging, balance: upright, both +- noise)."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        cfg, d = self.cfg, self.data
        mujoco.mj_resetData(self.model, d)
        self._episode_steps = 0
        self._schedule.reset_episode()
        self._update_effects()
        z = self._rng.standard_normal(4)
        x0 = float(np.clip(cfg.init_x_std_m * z[0], -cfg.safe_x_m / 2, cfg.safe_x_m / 2))
        theta0 = (math.pi if cfg.task == "swingup" else 0.0) + cfg.init_theta_std_rad * z[1]
        d.qpos[:] = (x0, theta0)
        d.qvel[:] = (cfg.init_xdot_std_m_s * z[2], cfg.init_thetadot_std_rad_s * z[3])
        mujoco.mj_forward(self.model, d)
        self._pending.clear()
        self._u_acting = 0.0
        # the device's encoders and velocity filter have been running before the episode starts
        self._enc = [_quantize(x0, cfg.cart_encoder_m), _quantize(theta0, self._theta_step)]
        self._vel = [float(d.qvel[0]), float(d.qvel[1])]
        self._in_contact = self._limit_latched = False
        self._advance_debt_s = 0.0
        self._wall_anchor_s = time.monotonic() - self.time_s
        return self._read()

    def _read(self) -> Observation:
        raw = dict(zip(OBS_CHANNELS, (*self._enc, *self._vel, self._u_acting), strict=True))
        if len(self._schedule):
            raw = self._schedule.apply_sensors(raw, self.episode_time_s, self.time_s)
        th = raw["theta_rad"]
        raw["theta_rad"] = wrap_angle(th) if math.isfinite(th) else th
        faults = Fault.LIMIT if (self._in_contact or self._limit_latched) else Fault.NONE
        info = {
            "sim_time_s": self.time_s,
            "episode_time_s": self.episode_time_s,
            "end_stop_hits": self.end_stop_hits,
        }
        return Observation(np.array([raw[c] for c in OBS_CHANNELS]), time.monotonic(), faults, info)

    def _send(self, action: np.ndarray) -> None:
        """Lockstep: queue the command, then simulate exactly one control period."""
        self.apply_command(float(action[0]))
        self._run(self.cfg.substeps)
        if self.cfg.realtime:
            ahead_s = self._wall_anchor_s + self.time_s - time.monotonic()
            if ahead_s > 0:
                time.sleep(ahead_s)

    def _safe_stop(self) -> None:
        """Zero motor command now, bypassing the actuation delay (the amplifier is disabled)."""
        self._pending.clear()
        self._u_acting = 0.0
        self.data.ctrl[0] = 0.0
        log.info("twin safe stop: motor command 0 at t=%.3f s", self.time_s)

    # -- ground truth (tests and measurement only) -----------------------------------------------
    def truth(self) -> TwinTruth:
        """Simulator state and true parameters. NEVER feed this to the learning stack or the gate."""
        d = self.data
        return TwinTruth(
            state=np.array([d.qpos[0], wrap_angle(float(d.qpos[1])), d.qvel[0], d.qvel[1]]),
            force_n=float(d.actuator_force[0]),
            u_acting=self._u_acting,
            actuator_gain=self._gain,
            params=dict(self._params),
            time_s=self.time_s,
            episode_time_s=self.episode_time_s,
            in_contact=self._in_contact,
            end_stop_hits=self.end_stop_hits,
        )
