"""Typed parameters of the cart-pole twin and its shift/fault schedule (no mujoco import here).

The defaults model a benchtop linear cart-pole in the style of a Quanser IP02 with the long pole:
a 0.94 kg cart on a ±0.5 m rail with rubber end stops at ±0.45 m, a 0.23 kg / 0.64 m pole on an
encoder hinge, a current-controlled DC motor (force limit 10 N, ~5 ms torque lag) and the encoder
resolutions of that rig. Every number lives here (and in YAML), never in the MJCF.

Schedule events (:class:`ScheduleEvent`) change parameters, corrupt sensors or degrade the actuator
at a given time; :mod:`robot_mbrl.sim.schedule` applies them, for the twin and the HIL emulator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from robot_mbrl.typedconfig import ConfigError, check_range, param

EventKind = Literal[
    "param_scale",
    "param_set",
    "sensor_bias",
    "sensor_freeze",
    "sensor_nan",
    "sensor_spike",
    "actuator_gain",
    "actuator_sign_flip",
]
PARAM_KINDS = ("param_scale", "param_set")
SENSOR_KINDS = ("sensor_bias", "sensor_freeze", "sensor_nan", "sensor_spike")
ACTUATOR_KINDS = ("actuator_gain", "actuator_sign_flip")

#: Observation channels of the twin, in order (see ``CartpoleTwin.spec``).
OBS_CHANNELS = ("x_m", "theta_rad", "xdot_m_s", "thetadot_rad_s", "u_applied")
#: The one action channel.
ACT_CHANNEL = "motor_u"
#: TwinConfig fields a schedule may change while the twin runs (physical parameters).
SCHEDULABLE_PARAMS = (
    "cart_mass_kg",
    "pole_mass_kg",
    "pole_length_m",
    "rail_coulomb_n",
    "rail_viscous_n_s_m",
    "hinge_damping_nm_s_rad",
    "hinge_coulomb_nm",
    "max_force_n",
    "motor_tau_s",
    "gravity_m_s2",
)


@dataclass(frozen=True)
class ScheduleEvent:
    """One timed shift or fault. Active while ``at_s <= t < at_s + duration_s`` on its clock.

    kinds (``target`` / ``value``):

    * ``param_scale``: multiply physical parameter ``target`` (a TwinConfig field) by ``value`` > 0;
    * ``param_set``: set physical parameter ``target`` to ``value`` (must be in the field's range);
    * ``sensor_bias``: add ``value`` (channel unit) to channel ``target``;
    * ``sensor_freeze``: channel ``target`` keeps reporting the value it had when the event began;
    * ``sensor_nan``: channel ``target`` reports NaN;
    * ``sensor_spike``: add ``value`` to channel ``target``; with ``duration_s: null`` only to the
      first reading at or after ``at_s`` (a single glitch), else to every reading in the window;
    * ``actuator_gain``: multiply the motor force by ``value`` (target ``motor_u`` or empty);
    * ``actuator_sign_flip``: negate the motor force (a swapped motor lead; ``value`` unused).

    Several events on the same target compose in ``at_s`` order (set replaces, scale multiplies).
    """

    at_s: float = param(doc="start time of the event in seconds on its clock", ge=0.0)
    kind: EventKind = param(doc="what happens: " + ", ".join(PARAM_KINDS + SENSOR_KINDS + ACTUATOR_KINDS))
    target: str = param("", "physical parameter name (param_*), obs channel (sensor_*), motor_u or ''")
    value: float = param(0.0, "scale factor, new value, bias/spike in channel units, or gain")
    duration_s: float | None = param(None, "how long the event lasts in s; null = until the end", gt=0.0)
    clock: Literal["episode", "total"] = param(
        "episode", "episode: time since the last reset; total: time since the twin was created"
    )

    def validate(self) -> None:
        if self.kind in PARAM_KINDS:
            if self.target not in SCHEDULABLE_PARAMS:
                raise ValueError(f"{self.kind} target must be one of {', '.join(SCHEDULABLE_PARAMS)}")
            if self.kind == "param_scale" and not self.value > 0:
                raise ValueError("param_scale value must be > 0")
            if self.kind == "param_set":
                check_param_range(self.target, self.value)
        elif self.kind in SENSOR_KINDS:
            if self.target not in OBS_CHANNELS:
                raise ValueError(f"{self.kind} target must be one of {', '.join(OBS_CHANNELS)}")
        elif self.target not in ("", ACT_CHANNEL):
            raise ValueError(f"{self.kind} target must be '{ACT_CHANNEL}' or empty")
        if not math.isfinite(self.value):
            raise ValueError("value must be finite")


@dataclass(frozen=True)
class TwinConfig:
    """The cart-pole twin: mechanics, motor, sensors, task and schedule. Units are in the names."""

    # -- mechanics -------------------------------------------------------------------------------
    cart_mass_kg: float = param(0.94, "cart mass including motor pinion (IP02: 0.94 kg)", ge=0.01, le=50.0)
    pole_mass_kg: float = param(0.23, "pole mass, a uniform rod (IP02 long pole: 0.23 kg)", ge=0.001, le=10.0)
    pole_length_m: float = param(0.64, "full pole length, pivot at one end (IP02: 0.64 m)", ge=0.01, le=3.0)
    gravity_m_s2: float = param(9.81, "gravitational acceleration", ge=0.0, le=30.0)
    rail_half_length_m: float = param(0.5, "half length of the rail; the x_m reading range", gt=0.0, le=5.0)
    end_stop_x_m: float = param(
        0.45, "cart position at which the cart touches a rubber end stop (contact, Fault.LIMIT)", gt=0.0
    )
    rail_coulomb_n: float = param(0.3, "Coulomb (dry) friction of the cart on the rail", ge=0.0, le=20.0)
    rail_viscous_n_s_m: float = param(
        1.0, "viscous friction of cart, belt and motor bearings (no back-EMF: force control)", ge=0.0
    )
    hinge_damping_nm_s_rad: float = param(0.0024, "viscous damping of the pole hinge (IP02: 0.0024)", ge=0.0)
    hinge_coulomb_nm: float = param(0.0, "dry friction torque of the pole hinge", ge=0.0)
    # -- motor -----------------------------------------------------------------------------------
    max_force_n: float = param(10.0, "force at command u = 1 (amplifier current limit)", gt=0.0, le=200.0)
    motor_tau_s: float = param(0.005, "first-order lag of motor force (current loop + belt)", ge=0.0, le=0.5)
    actuation_delay_ticks: int = param(
        1, "control periods between writing a command and it acting (write at t acts from t+1)", ge=0, le=10
    )
    act_rate_per_s: float = param(50.0, "max |du/dt| of the normalized command, 1/s", gt=0.0)
    # -- sensors ---------------------------------------------------------------------------------
    cart_encoder_m: float = param(2.3e-5, "cart encoder resolution (m per count); 0 = exact", ge=0.0)
    pole_encoder_counts_per_rev: int = param(4096, "pole encoder counts per revolution; 0 = exact", ge=0)
    cart_noise_std_m: float = param(1e-5, "Gaussian noise on the cart position before quantization", ge=0.0)
    pole_noise_std_rad: float = param(5e-4, "Gaussian noise on the pole angle before quantization", ge=0.0)
    velocity_cutoff_hz: float = param(
        20.0, "cutoff of the first-order low-pass on finite-difference velocities (device side)", gt=0.0
    )
    xdot_range_m_s: float = param(5.0, "physical range of the xdot_m_s reading (±)", gt=0.0)
    thetadot_range_rad_s: float = param(30.0, "physical range of the thetadot_rad_s reading (±)", gt=0.0)
    # -- timing ----------------------------------------------------------------------------------
    physics_dt_s: float = param(0.002, "MuJoCo time step (also the device's sensor sampling period)", gt=0.0)
    control_hz: float = param(50.0, "control rate; must be an integer divisor of 1/physics_dt_s", gt=0.0)
    realtime: bool = param(False, "true: write() never lets simulated time run ahead of the wall clock")
    # -- task and episode start ------------------------------------------------------------------
    task: Literal["swingup", "balance"] = param("swingup", "swingup starts hanging, balance upright")
    safe_x_m: float = param(0.35, "track-limit constraint |x| <= safe_x_m (RobotSpec.constraints)", gt=0.0)
    init_x_std_m: float = param(0.02, "std of the initial cart position", ge=0.0)
    init_theta_std_rad: float = param(0.05, "std of the initial pole angle around hanging/upright", ge=0.0)
    init_xdot_std_m_s: float = param(0.01, "std of the initial cart velocity", ge=0.0)
    init_thetadot_std_rad_s: float = param(0.05, "std of the initial pole angular velocity", ge=0.0)
    # -- shifts and faults -----------------------------------------------------------------------
    schedule: tuple[ScheduleEvent, ...] = param((), "timed parameter shifts, sensor and actuator faults")

    @property
    def substeps(self) -> int:
        """Physics steps per control period."""
        return round(1.0 / (self.control_hz * self.physics_dt_s))

    def physical_params(self) -> dict[str, float]:
        """The schedulable physical parameters as a name -> value mapping."""
        return {name: float(getattr(self, name)) for name in SCHEDULABLE_PARAMS}

    def validate(self) -> None:
        ratio = 1.0 / (self.control_hz * self.physics_dt_s)
        if self.substeps < 1 or abs(ratio - self.substeps) > 1e-6:
            raise ValueError("1 / (control_hz * physics_dt_s) must be a positive integer")
        if not self.end_stop_x_m < self.rail_half_length_m:
            raise ValueError("end_stop_x_m must be < rail_half_length_m")
        if not self.safe_x_m < self.end_stop_x_m:
            raise ValueError("safe_x_m must be < end_stop_x_m")
        for event in self.schedule:
            event.validate()


def check_param_range(name: str, value: float) -> None:
    """Raise ValueError if ``value`` is outside the declared range of TwinConfig field ``name``."""
    field = {f.name: f for f in dataclasses.fields(TwinConfig)}[name]
    try:
        check_range(field, value, "schedule", name)
    except ConfigError as err:
        raise ValueError(f"{name} must be {err.expected.removeprefix('a value ')}, got {value}") from None


__all__ = [
    "ACT_CHANNEL",
    "ConfigError",
    "OBS_CHANNELS",
    "SCHEDULABLE_PARAMS",
    "ScheduleEvent",
    "TwinConfig",
    "check_param_range",
]
