"""`robot-mbrl`: train, run, commission, emulate, config.

Errors a user can fix (bad config, missing checkpoint, corrupt file) print one line on stderr and
exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import queue
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from robot_mbrl.typedconfig import ConfigError

log = logging.getLogger("robot_mbrl")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML path or packaged config name (default: cartpole_swingup)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. twin.pole_mass_kg=0.3 (repeatable)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed for every stochastic component")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<command>-<time>)")
    p.add_argument("--no-gate", action="store_true", help="disable the safety gate (comparisons only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _robot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("twin", "serial", "gym"), default=None, help="override backend")
    p.add_argument(
        "--port",
        default=None,
        help="serial port or URL for --backend serial (e.g. /dev/robot-mcu, drivers/WIRING.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robot-mbrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="learn a dynamics model + value and control with the gated MPC")
    _common(p)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="real steps to learn from (train.steps; the last episode is cut short to keep to it)",
    )
    p.add_argument("--resume", type=Path, default=None, help="continue a killed run from its directory")
    p.add_argument(
        "--salvage-buffer",
        action="store_true",
        help="with --resume: leave out a corrupt buffer chunk (renamed *.corrupt) instead of stopping",
    )
    _robot_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run a controller (learned, gated) or a simple policy")
    _common(p)
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint dir (a run dir or its checkpoint/)"
    )
    p.add_argument("--episodes", type=int, default=None, help="episodes to run (run.episodes)")
    p.add_argument(
        "--policy",
        choices=("random", "safe", "zero"),
        default=None,
        help="simple policy when no checkpoint is given (run.policy)",
    )
    _robot_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "commission",
        help="calibrate a checkpoint's shift monitors on an in-control run of its own controller (Phase I)",
    )
    _common(p)
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint dir (a run dir or its checkpoint/)"
    )
    p.add_argument("--episodes", type=int, default=4, help="episodes of the commissioning run (default 4)")
    _robot_args(p)
    p.set_defaults(func=cmd_commission)

    p = sub.add_parser("emulate", help="serve the twin as a virtual device behind the wire protocol")
    _config_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the twin's noise and start states")
    p.add_argument(
        "--link",
        choices=("pty", "socket"),
        default="pty",
        help="a pseudo-terminal (a serial port's path) or a TCP socket (a socket:// URL); default pty",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)"
    )
    p.add_argument(
        "--port-link",
        type=Path,
        default=None,
        metavar="PATH",
        help="also make PATH a symlink to the pty (a fixed port name across restarts, like a udev "
        "rule's /dev/robot-mcu: a run's config.yaml keeps working); removed on exit",
    )
    for flag, what in (
        ("--corrupt-rate", "probability that a byte on the wire gets a bit flipped (both directions)"),
        ("--drop-rate", "probability that a byte on the wire is lost"),
        ("--frame-drop-rate", "probability that a whole device frame (or host write) is lost"),
    ):
        p.add_argument(flag, type=float, default=0.0, metavar="P", help=f"{what}; default 0 (a clean link)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_emulate)

    p = sub.add_parser("config", help="print the resolved config (after --set) as YAML")
    _config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from robot_mbrl.config import load_config

    flagged = list(extra or [])
    if getattr(args, "seed", None) is not None:
        flagged.append(f"seed={args.seed}")
    overrides = list(args.overrides) + flagged
    # keys set by a flag are blamed on the flag, not on --set
    args.flag_keys = {k: FLAG_OF[k] for k in (ov.split("=", 1)[0] for ov in flagged) if k in FLAG_OF}
    args.applied_overrides = overrides  # for errors found once the robot is known (_labelled)
    return load_config(args.config, overrides, args.flag_keys)


FLAG_OF = {"seed": "--seed", "run.gate": "--no-gate", "backend": "--backend", "serial.port": "--port",
           "train.steps": "--steps", "run.episodes": "--episodes", "run.policy": "--policy"}  # fmt: skip


def _positive(flag: str, value: int, what: str) -> None:
    """A count given by a flag is blamed on the flag (through its config key, on ``--set``)."""
    if value < 1:
        raise UserError(f"{flag} {value}: expected {what} >= 1")


def _job_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` equivalents of the flags run, commission and train share."""
    extra = ["run.gate=false"] if args.no_gate else []
    if args.backend is not None:
        extra.append(f"backend={args.backend}")
    if args.port is not None:  # kept in the run's config: train --resume finds the rig (or give --port again)
        extra.append(f"serial.port={args.port}")
    return extra


def _warn_ungated(cfg) -> None:  # noqa: ANN001 - a Config
    if not cfg.run.gate:
        log.warning("the safety gate is off (--no-gate / run.gate: false): the learned controller's actions "
                    "reach the robot unchecked (exploration and homing stay shielded)")  # fmt: skip


def _check_port(args: argparse.Namespace, cfg) -> None:  # noqa: ANN001 - a Config
    if args.port is not None and cfg.backend != "serial":
        raise UserError(f"--port {args.port}: expected --backend serial, got backend {cfg.backend}")


def _checkpoint_config(args: argparse.Namespace) -> None:
    """With no CONFIG, a job on a checkpoint runs under the config its run was trained with."""
    if args.checkpoint is not None and args.checkpoint.is_file():  # RUN/checkpoint/model.pt: its folder
        args.checkpoint = args.checkpoint.parent
    ck = args.checkpoint
    if args.config is not None or ck is None:
        return
    for cand in (ck / "config.yaml", ck.parent / "config.yaml" if ck.name == "checkpoint" else None):
        if cand is not None and cand.is_file():
            args.config = str(cand)
            return
    if ck.exists():  # (a missing checkpoint is reported as such by the job; its task is checked on load)
        log.warning("--checkpoint %s: no config.yaml of its run beside it: running under the default config "
                    "(give the CONFIG it was trained with: robot-mbrl run CONFIG --checkpoint ...)", ck)  # fmt: skip


def _check_backend_family(config: Path, backend: str, flag: str) -> None:
    """A checkpoint learned on a gymnasium env runs on that env, one learned on the cart-pole (twin or
    rig) on the cart-pole: ``--backend`` across the two reported as such (it failed on whichever of
    the run's settings the other robot rejected first)."""
    import yaml

    try:
        trained = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("backend")
    except (OSError, yaml.YAMLError, AttributeError):
        return  # (read and reported by the job)
    if isinstance(trained, str) and (trained == "gym") != (backend == "gym"):
        raise UserError(
            f"{flag}: expected backend {'gym' if trained == 'gym' else 'twin or serial'}, got {backend}: "
            f"the checkpoint was learned on backend {trained} ({config}), a job runs it on its own task's robot"
        )


def _checkpoint_job_config(args: argparse.Namespace, extra: list[str]):  # -> Config
    """The config of a job on a checkpoint (``_checkpoint_config``). A run trained with ``--no-gate``
    (a comparison) has ``run.gate: false`` in its config.yaml: not a property of its controller, so a
    job that inherits it runs gated (with a WARNING) unless ``--no-gate`` or ``--set run.gate=...`` says
    otherwise."""
    inherited = args.config is None
    _checkpoint_config(args)
    sets = [
        o.split("=", 1)[1].strip()
        for o in args.overrides
        if "=" in o and o.split("=", 1)[0].strip() == "backend"
    ]
    if args.backend is not None:  # (the flag wins over --set, as in _load)
        sets.append(args.backend)
    if inherited and args.config is not None and sets:
        flag = "--backend" if args.backend is not None else "--set backend"
        _check_backend_family(Path(args.config), sets[-1], f"{flag} {sets[-1]}")
    cfg = _load(args, extra)
    set_keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    if (
        inherited
        and args.config is not None
        and not cfg.run.gate
        and not args.no_gate
        and "run.gate" not in set_keys
    ):
        log.warning("%s: the run was trained with --no-gate; this job is gated (give --no-gate to run it ungated)",
                    args.config)  # fmt: skip
        cfg = _load(args, [*extra, "run.gate=true"])
    return cfg


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from robot_mbrl.agents.explore import shield_pairs
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import config_to_dict
    from robot_mbrl.factory import make_robot, make_task
    from robot_mbrl.runtime.homing import make_homing
    from robot_mbrl.safety.fallback import make_fallback

    cfg = _load(args)
    # the channel names every job checks against its robot's before any robot time (none is reached)
    spec = make_robot(cfg).spec
    MPCAgent(cfg, spec, make_task(cfg))
    make_homing(cfg, spec)
    make_fallback(cfg.fallback, spec)
    shield_pairs(spec, cfg.explore)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from robot_mbrl.runtime.jobs import run_job

    extra = _job_overrides(args)
    if args.episodes is not None:
        _positive("--episodes", args.episodes, "episodes")
        extra.append(f"run.episodes={args.episodes}")
    if args.policy is not None:
        if args.checkpoint is not None:
            raise UserError(
                f"--policy {args.policy}: expected either --checkpoint (the learned controller) or --policy "
                "(no model), got both"
            )
        extra.append(f"run.policy={args.policy}")
    if args.no_gate and args.checkpoint is None:  # (random and safe run inside their own shields)
        raise UserError(
            "--no-gate: expected --checkpoint (the gate guards the learned controller), got none: "
            f"run.policy {args.policy or 'of the config'} runs without the gate anyway"
        )
    cfg = _checkpoint_job_config(args, extra)
    _check_port(args, cfg)
    if args.checkpoint is None and args.policy is None:
        log.warning("no --checkpoint: running run.policy %s, no learned controller (give --checkpoint RUN to "
                    "run one)", cfg.run.policy)  # fmt: skip
    elif args.checkpoint is not None:  # (a policy has no gate to be off)
        _warn_ungated(cfg)
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise UserError(
            f"--checkpoint {args.checkpoint}: expected an existing run or checkpoint directory, got nothing there"
        )
    summary, out = run_job(cfg, checkpoint=args.checkpoint, out=args.out, progress=not args.quiet)
    _report(summary, out)
    return 0


def cmd_commission(args: argparse.Namespace) -> int:
    from robot_mbrl.runtime.jobs import commission_job

    _positive("--episodes", args.episodes, "episodes")
    extra = [*_job_overrides(args), f"run.episodes={args.episodes}"]
    cfg = _checkpoint_job_config(args, extra)
    _check_port(args, cfg)
    if not cfg.run.gate:
        raise UserError(
            "commission: expected the gated controller (its monitors are calibrated on the controller as it "
            f"will run), got {'--no-gate' if args.no_gate else 'run.gate: false (--set run.gate=true)'}"
        )
    if not args.checkpoint.exists():
        raise UserError(
            f"--checkpoint {args.checkpoint}: expected an existing run or checkpoint directory, got nothing there"
        )
    summary, out = commission_job(cfg, checkpoint=args.checkpoint, out=args.out, progress=not args.quiet)
    _report(summary, out)
    c = summary["commission"]
    print(f"commissioned {args.checkpoint} on {c['transitions']} transitions: OOD threshold "
          f"{c['before']['ood']:.4g} -> {c['after']['ood']:.4g}")  # fmt: skip
    print(f"next: robot-mbrl run --checkpoint {args.checkpoint}   (the commissioned controller, gated)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from robot_mbrl.runtime.train import train_job

    extra = _job_overrides(args)
    if args.steps is not None:
        _positive("--steps", args.steps, "real steps")
        extra.append(f"train.steps={args.steps}")
    if args.resume is not None:
        if not (args.resume / "config.yaml").is_file():
            raise UserError(f"--resume {args.resume}: expected a run directory with config.yaml, got none")
        if args.config is not None:  # the run's config is its own: another would mix two jobs in one run
            raise UserError(
                f"--resume {args.resume}: expected no CONFIG (the run continues under its config.yaml; "
                f"change keys with --set), got {args.config}"
            )
        args.config = str(args.resume / "config.yaml")
    cfg = _load(args, extra)
    _check_port(args, cfg)
    _warn_ungated(cfg)
    if args.salvage_buffer and args.resume is None:
        raise UserError("--salvage-buffer: expected --resume RUN, got a new run")
    summary, out = train_job(
        cfg, out=args.resume or args.out, resume=args.resume is not None, progress=not args.quiet,
        salvage=args.salvage_buffer,
    )  # fmt: skip
    _report(summary, out)
    if (out / "checkpoint").is_dir():
        print(f"next: robot-mbrl commission --checkpoint {out}   (calibrate the monitors before deployment)")
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from robot_mbrl.hil.emulator import serve_twin
    from robot_mbrl.sim.cartpole import CartpoleTwin

    cfg = _load(args)
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration: expected seconds > 0 (or none: until Ctrl-C), got {args.duration}")
    if cfg.backend == "gym":
        raise UserError(
            f"{args.config}: expected a cart-pole config (emulate serves the cart-pole twin), got backend gym"
        )
    rates = {"--corrupt-rate": args.corrupt_rate, "--drop-rate": args.drop_rate,
             "--frame-drop-rate": args.frame_drop_rate}  # fmt: skip
    for flag, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise UserError(f"{flag}: expected a probability in [0, 1), got {rate}")
    if args.port_link is not None:
        if args.link != "pty":
            raise UserError(f"--port-link {args.port_link}: expected --link pty, got --link {args.link}")
        if args.port_link.exists() and not args.port_link.is_symlink():
            raise UserError(f"--port-link {args.port_link}: expected a free path or an old link, got a file")
    faults = None
    if any(rates.values()):
        from robot_mbrl.hil.faults import FaultConfig

        faults = FaultConfig(corrupt_rate=args.corrupt_rate, drop_rate=args.drop_rate,
                             chunk_drop_rate=args.frame_drop_rate)  # fmt: skip
    twin = CartpoleTwin(cfg.twin, seed=cfg.seed)
    twin.connect()
    twin.reset(cfg.seed)
    emulator, port = serve_twin(
        twin, args.link, watchdog_ms=cfg.serial.watchdog_ms, faults=faults, seed=cfg.seed
    )
    target = Path(port).resolve()
    if args.port_link is not None:
        try:
            args.port_link.unlink(missing_ok=True)  # (an old link: a restart)
            args.port_link.symlink_to(target)
        except OSError:
            emulator.stop()
            twin.close()
            raise
        port = str(args.port_link)

    def terminate(signum: int, frame: object) -> None:  # `kill`, a service manager: clean up as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        print(f"emulating the cart-pole rig ({cfg.twin.task}) on {port}")
        if faults is not None:
            print(f"faulty link: {', '.join(f'{f} {r}' for f, r in rates.items() if r)} (seed {cfg.seed})")
        print(f"connect with: robot-mbrl run --backend serial --port {port} [--checkpoint RUN_DIR]")
        print(f"   or learn on it: robot-mbrl train --backend serial --port {port}")
        if any(e.clock == "episode" for e in cfg.twin.schedule):  # a device knows no episodes
            print("note: twin.schedule events with clock: episode count from the emulator's start here")
        sys.stdout.flush()
        t0 = time.monotonic()
        while args.duration is None or time.monotonic() - t0 < args.duration:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
        twin.close()
        # (only our own link: a restarted emulator may have taken the name over meanwhile)
        if args.port_link is not None and args.port_link.is_symlink() and args.port_link.readlink() == target:
            args.port_link.unlink()
    print(f"device received {len(emulator.command_log())} commands")
    link = emulator.link
    if faults is not None:
        print(f"link faults injected: {link.bytes_corrupted} bytes corrupted, {link.bytes_dropped} bytes and "
              f"{link.chunks_dropped} frames dropped")  # fmt: skip
    return 0


def _report(summary: dict, out: Path) -> None:
    plan, tick, final = summary["plan_ms"], summary["tick_ms"], summary["final_return"]
    evals = summary.get("eval_returns")  # train's: the evaluations, and when the task was solved
    learned = (
        f"  last evaluation {evals[-1]:.2f}  solved at {summary['solved_at_step'] or 'not yet'}"
        if evals
        else ""
    )
    planned = (
        f"plan ms p50/p99/max {plan['p50']:.2f}/{plan['p99']:.2f}/{plan['max']:.2f}" if plan else "no plans"
    )
    print(
        f"run dir: {out}\n"
        f"episodes {summary['episodes']}  real steps {summary['real_steps']}  "
        f"last episode's return {'-' if final is None else f'{final:.2f}'}{learned}\n"
        f"violations {summary['violations']}  fallback ticks {summary['fallback_ticks']}/{summary['ticks']}  "
        f"alarms {len(summary['alarms'])}  deadline misses {summary['deadline_misses']}  {planned}  "
        f"tick ms p50/p99/max {tick['p50']:.2f}/{tick['p99']:.2f}/{tick['max']:.2f}  wall {summary['wall_s']:.1f} s"
    )
    if "link" in summary:
        k = defaultdict(int, summary["link"])  # (a run's counters from an older version may lack some)
        print(f"link: {k['crc_errors']} CRC / {k['framing_errors']} framing errors, {k['frames_dropped']} STATE "
              f"frames lost, {k['link_losses']} link losses, {k['reconnects']} reconnects "
              f"({k['reconnect_failures']} failed attempts), {k['device_restarts']} device restarts; "
              f"{k['frames_skipped']} stale STATE frames skipped after {k['host_pauses']} host pauses")  # fmt: skip


@contextmanager
def queued_logging(
    level: int, stream: TextIO | None = None, logger: logging.Logger | None = None
) -> Iterator[None]:
    """Log records are queued where they happen and written to ``stream`` (stderr) by a listener
    thread: a terminal that blocks (an operator's Ctrl-S, a stalled ssh session) never stalls a
    control tick that logs. Like ``logging.basicConfig``, it leaves a logger that already has
    handlers (an embedding program's, pytest's) alone."""
    logger = logger or logging.getLogger()
    if logger.handlers:
        yield
        return
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    q: queue.SimpleQueue = queue.SimpleQueue()
    listener, handler = logging.handlers.QueueListener(q, out), logging.handlers.QueueHandler(q)
    logger.addHandler(handler)
    level_before = logger.level
    logger.setLevel(level)
    listener.start()
    try:
        yield
    finally:
        listener.stop()  # writes what is queued
        logger.removeHandler(handler)
        logger.setLevel(level_before)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with queued_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING):
        rc, message = _run(args)
    if message:  # after the queued log lines: the last line is the one that says what went wrong
        print(f"robot-mbrl {args.command}: {message}", file=sys.stderr)
    return rc


def _labelled(err: ConfigError, args: argparse.Namespace) -> ConfigError:
    """A setting found wrong once the robot is known (channel names, say) names the config it came
    from, as a load error does: the file (or packaged name), and "(--set)" where --set gave it."""
    if err.source != "config":
        return err
    from robot_mbrl.config import DEFAULT_CONFIG, blame

    keys = [ov.split("=")[0] for ov in getattr(args, "applied_overrides", [])]
    source = getattr(args, "config", None) or f"{DEFAULT_CONFIG}.yaml"
    return blame(err, source, keys, getattr(args, "flag_keys", None))


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    from robot_mbrl.errors import USER_ERRORS

    try:
        return args.func(args), None
    except ConfigError as err:
        return 2, str(_labelled(err, args))
    except (UserError, *USER_ERRORS) as err:
        return 2, str(err)
    except KeyboardInterrupt:
        return 130, "interrupted (robot safe-stopped)"
    except OSError as err:  # the file system: permissions, a read-only mount, a full disk
        return 1, f"{err} (what was written before is kept)"
    except SystemExit as err:
        if err.code == 128 + signal.SIGTERM:  # robot_mbrl.hal.robot.stop_on_signals
            return int(err.code), "terminated (robot safe-stopped)"
        raise


if __name__ == "__main__":
    sys.exit(main())
