"""The top-level configuration: one frozen tree of typed sections, loaded from YAML + ``--set``.

Each section is owned by the module that uses it (``TwinConfig`` in sim/params.py, ``PlannerConfig``
in planning/mpc.py, ...); this file only composes them and loads files. Derived values are computed
in one place (:func:`episode_seconds` and friends), never written back into a loaded config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from robot_mbrl.agents.explore import ExploreConfig
from robot_mbrl.data.buffer import BufferConfig
from robot_mbrl.data.symmetry import SymmetryConfig
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.models.ensemble import EnsembleConfig
from robot_mbrl.models.trainer import ScheduleConfig, TrainerConfig
from robot_mbrl.planning.mpc import PlannerConfig
from robot_mbrl.planning.value import ValueConfig
from robot_mbrl.runtime.homing import HomingConfig
from robot_mbrl.safety.fallback import FallbackConfig
from robot_mbrl.safety.gate import GateConfig
from robot_mbrl.safety.monitors import ShiftConfig
from robot_mbrl.sim.params import TwinConfig
from robot_mbrl.typedconfig import ConfigError, build, param, to_dict

DEFAULT_CONFIG = "cartpole_swingup"


@dataclass(frozen=True)
class GymConfig:
    """Any gymnasium env with Box spaces as the backend (reward and termination from the env)."""

    env_id: str = param("InvertedPendulum-v5", "gymnasium id, e.g. InvertedPendulum-v5")
    control_hz: float | None = param(
        None,
        "the env's control rate; null: 1 / the env's dt (its step time; a WARNING where a set one differs)",
        gt=0,
    )
    kwargs: dict[str, Any] = param(factory=dict, doc="keyword arguments for gymnasium.make")
    obs_names: tuple[str, ...] = param(
        (), "names of the env's observation channels, in order (empty: obs_0, obs_1, ...)"
    )
    angle_channels: tuple[str, ...] = param(
        (),
        "observation channels that are angles in radians: wrapped into (-pi, pi], seen as sin/cos by the models",
    )
    terminal_channels: tuple[str, ...] = param(
        (), "the env's documented termination rule, for the planner: these observation channels ..."
    )
    terminal_low: tuple[float, ...] = param((), "... end the episode below these values (one per channel)")
    terminal_high: tuple[float, ...] = param((), "... or above these values (one per channel)")

    def validate(self) -> None:
        n = len(self.terminal_channels)
        if len(self.terminal_low) != n or len(self.terminal_high) != n:
            raise ValueError(
                f"terminal_low and terminal_high with one value per terminal channel ({n}; they have "
                f"{len(self.terminal_low)} and {len(self.terminal_high)})"
            )


@dataclass(frozen=True)
class TaskConfig:
    episode_steps: int = param(250, "ticks per episode (250 = 5 s at 50 Hz)", ge=1)
    solved_return: float | None = param(
        None, "mean evaluation return that counts as solved; null = solved_fraction x max return"
    )
    solved_fraction: float = param(
        0.8, "fraction of the maximum episode return that counts as solved", gt=0, le=1
    )
    solved_min_mpc_fraction: float = param(
        0.9,
        "solved also needs the learned controller in charge (not the fallback) for at least this "
        "fraction of the evaluation ticks: a safe policy that does the task alone is not a learning result",
        ge=0,
        le=1,
    )


@dataclass(frozen=True)
class LoopConfig:
    paced: bool = param(False, "pace ticks on the wall clock; false = lockstep (twin as fast as possible)")
    plan_budget_fraction: float = param(
        0.8,
        "fraction of the control period the planner may use; on a paced loop the tick stops waiting for the "
        "plan there and the gate writes the fallback (deadline_missed)",
        gt=0,
        le=1,
    )
    preempt_planner: bool = param(
        True,
        "on the wall clock, plan on a worker thread and stop waiting at the budget (the fallback is written on "
        "time when the planner hangs); false: the plan is computed in the tick's thread and a late one is judged "
        "after it returns, the device watchdog the backstop",
    )
    sample_wait_fraction: float = param(
        0.25,
        "on a robot that samples on its own clock (a serial device), each tick waits up to this fraction of the "
        "period for the device's next sample and keeps the ticks just after the samples (SampleSync in "
        "runtime/loop.py); 0 = off: the ticks keep the phase the reset left, and one at the device's sampling "
        "instant loses most of an episode's vouched transitions",
        ge=0,
        le=0.5,
    )
    plan_hang_s: float = param(
        2.0,
        "after an episode, how long to wait for a planner call still running (one the tick gave up on) "
        "before the job stops with an error: a planner that never returns cannot be retrained under",
        gt=0,
    )
    rt_priority: int = param(
        0,
        "SCHED_FIFO priority (1-99) of the control thread during paced episodes and homing, so other "
        "processes on the robot's CPU cannot delay a tick (Linux; needs CAP_SYS_NICE or an rtprio "
        "limit, else a warning and normal scheduling); 0 = normal scheduling",
        ge=0,
        le=99,
    )


@dataclass(frozen=True)
class RunConfig:
    episodes: int = param(3, "episodes to run", ge=1)
    policy: str = param("safe", "controller without a checkpoint", choices=("random", "safe", "zero", "mpc"))
    gate: bool = param(True, "Simplex safety gate on (false = --no-gate, for comparisons only)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = param(
        1500, "real steps (robot ticks) to learn from; the last episode is cut short to keep to it", ge=1
    )
    explore_episodes: int = param(1, "episodes of seeded random exploration before the first model", ge=0)
    explore_correlation: float = param(0.9, "AR(1) correlation of the exploration noise", ge=0, lt=1)
    eval_episodes: int = param(3, "evaluation episodes after each learning episode", ge=0)
    eval_every_episodes: int = param(1, "evaluate every this many learning episodes", ge=1)
    stop_when_solved: bool = param(True, "stop once the evaluation return reaches the solved threshold")


@dataclass(frozen=True)
class CalibrationConfig:
    """How gate thresholds are set from held-out in-distribution data after every retrain."""

    disagreement_false_alarm_rate: float = param(
        0.01,
        "target fraction of in-distribution k-step segments whose disagreement trips the gate",
        gt=0,
        lt=1,
    )
    margin: float = param(1.0, "multiplier on the calibrated disagreement threshold", gt=0)


@dataclass(frozen=True)
class Config:
    seed: int = param(0, "seed for every stochastic component", ge=0, le=2**32 - 1)
    backend: Literal["twin", "gym", "serial"] = param("twin", "what the controller drives")
    twin: TwinConfig = param(factory=TwinConfig)
    gym: GymConfig = param(factory=GymConfig)
    serial: SerialConfig = param(factory=SerialConfig)
    task: TaskConfig = param(factory=TaskConfig)
    loop: LoopConfig = param(factory=LoopConfig)
    run: RunConfig = param(factory=RunConfig)
    train: TrainConfig = param(factory=TrainConfig)
    buffer: BufferConfig = param(factory=BufferConfig)
    model: EnsembleConfig = param(factory=EnsembleConfig)
    trainer: TrainerConfig = param(factory=TrainerConfig)
    retrain: ScheduleConfig = param(factory=ScheduleConfig)
    planner: PlannerConfig = param(factory=PlannerConfig)
    value: ValueConfig = param(factory=ValueConfig)
    gate: GateConfig = param(factory=GateConfig)
    calibration: CalibrationConfig = param(factory=CalibrationConfig)
    monitor: ShiftConfig = param(factory=ShiftConfig)
    fallback: FallbackConfig = param(factory=FallbackConfig)
    explore: ExploreConfig = param(factory=ExploreConfig)
    symmetry: SymmetryConfig = param(factory=SymmetryConfig)
    homing: HomingConfig = param(factory=HomingConfig)


def is_paced(cfg: Config) -> bool:
    """The job runs on the wall clock (``loop.paced``, or a real device, which does not wait for us)."""
    return cfg.loop.paced or cfg.backend == "serial"


def packaged_configs() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("robot_mbrl.configs").iterdir() if p.name.endswith(".yaml")
    )


def resolve_path(name_or_path: str | None) -> tuple[str, str]:
    """(source label, YAML text) for a file path or the name of a packaged config."""
    name = name_or_path or DEFAULT_CONFIG
    path = Path(name)
    packaged = path.name == name and path.suffix == ".yaml" and path.stem in packaged_configs()
    if packaged and not path.exists():  # "cartpole_swingup.yaml": the packaged one, as messages name it
        name = path.stem
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            got = (
                "a directory" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
            )
            raise ConfigError(str(path), "<file>", "an existing YAML file", got)
        try:
            return str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                str(path), "<file>", "UTF-8 text", f"undecodable bytes at offset {err.start}"
            ) from None
    res = resources.files("robot_mbrl.configs") / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(name, "<file>", "a YAML path or one of " + ", ".join(packaged_configs()), name)
    return f"{name}.yaml", res.read_text(encoding="utf-8")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], typed value). The value is read as YAML (safe loader)."""
    if "=" not in text:
        raise ConfigError("--set", text, "key=value", text)
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", key, "a dotted key like twin.pole_mass_kg", key)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError("--set", ".".join(keys), f"'{k}' to be a section", nxt)
        node = nxt
    node[keys[-1]] = value


def load_config(
    name_or_path: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """Load a config file (or packaged name), apply ``--set`` overrides, validate, freeze. ``flags``:
    the keys a command-line flag set (key -> flag), for errors to name the flag."""
    source, text = resolve_path(name_or_path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(source, where, "valid YAML", str(getattr(err, "problem", err))) from None
    if data is None:  # an empty file is a mistake, not "all library defaults"
        raise ConfigError(
            source, "<root>", "a mapping of sections (robot-mbrl config prints them)", "an empty file"
        )
    if not isinstance(data, dict):
        raise ConfigError(source, "<root>", "a mapping of sections", type(data).__name__)
    set_keys = []
    for ov in overrides:
        keys, value = parse_override(ov)
        _apply(data, keys, value)
        set_keys.append(".".join(keys))
    try:
        cfg = build(Config, data, source=source)
        _cross_check(cfg, source)
        return cfg
    except ConfigError as err:
        raise blame(err, source, set_keys, flags) from None


def blame(
    err: ConfigError, source: str, set_keys: list[str], flags: dict[str, str] | None = None
) -> ConfigError:
    """``err`` attributed to where its key came from: ``source`` (the config file or packaged name),
    with " (--set)" where an override set that key, a section above it or a key inside it, or the
    command-line flag that set it (``flags``: key -> flag, e.g. ``{"seed": "--seed"}``)."""
    key = err.key.split("[")[0]  # an element of a list: the key that was set

    def hit(k: str) -> bool:
        return key == k or key.startswith(k + ".") or k.startswith(key + ".")

    flag = next((f for k, f in (flags or {}).items() if hit(k)), None)
    if flag is not None:
        source = f"{source} ({flag})"
    elif any(hit(k) for k in set_keys):
        source = f"{source} (--set)"
    return ConfigError(source, err.key, err.expected, err.got)


def _cross_check(cfg: Config, source: str) -> None:
    """Settings each valid alone that contradict each other (found before any robot time)."""
    rail = cfg.backend in ("twin", "serial") and cfg.fallback.kind == "brake"  # the twin's, or a rig's
    checks = [  # (contradiction, key, expected, got)
        (cfg.trainer.min_transitions > cfg.retrain.min_transitions, "trainer.min_transitions",
         f"<= retrain.min_transitions ({cfg.retrain.min_transitions}): a retrain would have too few",
         cfg.trainer.min_transitions),
        (rail and cfg.fallback.safe_x_m >= cfg.twin.end_stop_x_m, "fallback.safe_x_m",
         f"< twin.end_stop_x_m ({cfg.twin.end_stop_x_m}): the brake's barrier must act before the end stop",
         cfg.fallback.safe_x_m),
        (rail and cfg.fallback.safe_x_m > cfg.twin.safe_x_m, "fallback.safe_x_m",
         f"<= twin.safe_x_m ({cfg.twin.safe_x_m}): the brake must keep the cart inside the constraint",
         cfg.fallback.safe_x_m),
        (cfg.gate.no_gate, "gate.no_gate",
         "false (the gate is turned off by run.gate: false or --no-gate; the job sets this one)", True),
    ]  # fmt: skip
    for bad, key, expected, got in checks:
        if bad:
            raise ConfigError(source, key, expected, got)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" merges, it is no key
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def config_to_dict(cfg: Config) -> dict:
    return to_dict(cfg)


def replace_in(cfg: Config, **sections: Any) -> Config:
    """A new Config with some sections replaced (the loaded one stays frozen and unchanged)."""
    return dataclasses.replace(cfg, **sections)


def task_id(cfg: Config) -> str:
    """What a checkpoint or buffer was learned on, as a config names it: the cart-pole task (twin or
    rig) or the gymnasium env. Files of another task have the same shapes but not the same job."""
    return f"gym:{cfg.gym.env_id}" if cfg.backend == "gym" else f"cartpole:{cfg.twin.task}"
