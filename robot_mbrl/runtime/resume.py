"""What a run directory recorded before a kill, for ``train --resume``: its tally (metrics.jsonl
required; timings and alarms if readable), the transitions each learning episode learned from and
the evaluations done, and the changed settings a resume writes back to config.yaml."""

from __future__ import annotations

import json
import logging
import math

import yaml

from robot_mbrl.errors import RunDirError
from robot_mbrl.runtime.rundir import RunDir, Tally

log = logging.getLogger(__name__)


def restore_tally(run: RunDir) -> tuple[Tally, int, list[dict], dict]:
    """What the run recorded before: its metrics (required), its plan/tick times and alarms (if
    unreadable: a warning, and they count from the resume). Also ``{"vouched": {episode id:
    transitions its record says were learned from} (None: a run from before that record), "evals":
    the labels of the evaluations done (the episode id after the one they followed)}``."""
    tally, episodes, retrains = Tally(), 0, []
    learned: dict[int, int] | None = {}
    evals: set[int] = set()
    path = run.path / "metrics.jsonl"
    try:
        metrics = run.metrics()
    except (ValueError, UnicodeDecodeError) as err:
        detail = str(err).removeprefix(f"{path}: ")  # (read_jsonl names the file already)
        raise RunDirError(
            f"{path}: {detail}: the run's record is damaged (mend the line, or start a new run)"
        ) from None
    learn_keys = ("episode", "return", "real_steps", "steps", "violations", "fallback_ticks", "deadline_misses",
                  "end_stop_hits")  # fmt: skip
    for i, rec in enumerate(metrics):
        if not isinstance(rec, dict):
            raise RunDirError(f"{path}: record {i + 1}: expected a JSON object, got {rec!r}")
        if rec.get("kind") == "learn":
            missing = [k for k in learn_keys if not isinstance(rec.get(k), int | float)]
            if missing:
                raise RunDirError(f"{path}: record {i + 1}: expected numbers for {missing}, got {rec}")
            tally.returns.append(rec["return"])
            if learned is not None and isinstance(rec.get("vouched"), int):
                learned[int(rec["episode"])] = rec["vouched"]
            else:
                learned = None
            tally.real_steps = rec["real_steps"]
            tally.ticks += rec["steps"]
            tally.violations += rec["violations"]
            tally.fallback_ticks += rec["fallback_ticks"]
            tally.deadline_misses += rec["deadline_misses"]
            tally.end_stop_hits += rec["end_stop_hits"]
            episodes = rec["episode"] + 1
        elif rec.get("kind") == "retrain":
            retrains.append(rec)
        elif rec.get("kind") == "eval":
            evals.add(rec.get("episode"))
            if rec.get("solved") and tally.solved_at_step is None:
                tally.solved_at_step = rec["real_steps"]
    # plan and tick times of the episodes that have their metrics line (the last line per episode:
    # one written just before a kill, its metrics line lost, may come again after the resume)
    recorded = {(rec.get("kind"), rec.get("episode")) for rec in metrics}
    try:
        times = {(t.get("kind"), t.get("episode")): t for t in run.timings() if isinstance(t, dict)}
        n_learn = sum(1 for rec in metrics if isinstance(rec, dict) and rec.get("kind") == "learn")
        timed = sum(1 for key in times if key in recorded and key[0] == "learn")
        if timed < n_learn:  # (a garbage last line is dropped as torn: say what is missing)
            log.warning("%s/timing.jsonl holds the times of %d of the %d recorded episodes: plan_ms and "
                        "tick_ms in summary.json count only those", run.path, timed, n_learn)  # fmt: skip
    except ValueError as err:  # times are not robot data: the run goes on, its percentiles restart
        log.warning("%s; plan_ms and tick_ms in summary.json count from the resume", err)
        times = {}
    for key, t in times.items():
        if key in recorded and key[0] in ("learn", "eval"):
            tally.plan_s += _ms_list(t, "plan_ms")
            if key[0] == "learn":  # the run's tick times are the learning episodes' (as in _evaluate)
                tally.tick_s += _ms_list(t, "tick_ms")
    try:
        events = run.events()
    except (ValueError, UnicodeDecodeError) as err:  # events are the record of alarms, not robot data
        log.warning("%s; the alarms in summary.json count from the resume", err)
        events = []
    for ev in events:  # the learning episodes' alarms and the retrains' val_loss alarms
        if isinstance(ev, dict) and ev.get("kind") == "alarm" and ev.get("phase") != "eval":
            tally.alarms.append({"tick": ev.get("run_tick", ev.get("tick")), "reason": ev.get("trigger")})
    before = _read_summary(run)
    if before.get("episodes", 0) > len(
        tally.returns
    ):  # metrics.jsonl lost or cut: summary.json is all that is left
        raise RunDirError(
            f"{path}: expected the {before['episodes']} episodes summary.json reports, got {len(tally.returns)} "
            "(restore metrics.jsonl, or start a new run: resuming would overwrite summary.json)"
        )
    # the job's wall time so far: the last finished job's, or where a killed one's last record got
    walls = [before.get("wall_s")] + [rec.get("wall_s") for rec in metrics if isinstance(rec, dict)]
    tally.wall_s = max(
        [float(w) for w in walls if isinstance(w, int | float) and math.isfinite(w)], default=0.0
    )
    link = before.get("link")  # the wire's counters up to the last finished job (a resume adds its own)
    return tally, episodes, retrains, {"vouched": learned, "evals": evals,
                                       "link": link if isinstance(link, dict) else None}  # fmt: skip


def _ms_list(record: dict, key: str) -> list[float]:
    """A timing record's times in seconds (a damaged record: none)."""
    values = record.get(key)
    if not isinstance(values, list):
        return []
    return [ms / 1e3 for ms in values if isinstance(ms, int | float)]


def record_changes(run: RunDir, resolved: dict) -> None:
    """A resume under changed keys (--set, --steps, --port, --seed): logged, and written to the run's
    config.yaml, so that the run's record and a later plain --resume hold what it now runs under."""
    try:
        before = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        before = None
    changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in _diff(before or {}, resolved).items()]
    if changed:
        log.warning("%s: resumed with changed settings: %s", run.path, "; ".join(changed))
        run.write_config(resolved)


# what a run's files were made under: its task (its buffer and checkpoint are that task's) and its
# networks' shapes (the checkpoint's win on load, so a changed one would only be written, not run)
FIXED_ON_RESUME = ("twin.task", "gym.env_id", "model.", "value.hidden", "value.layers", "value.heads",
                   "value.prior_scale", "value.seed")  # fmt: skip


def check_fixed(run: RunDir, resolved: dict) -> None:
    """Refuse a resume that changes what the run's files were made under (``FIXED_ON_RESUME``)."""
    try:
        before = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # (read and reported by the resume itself)
    changed = {k: v for k, v in _diff(before if isinstance(before, dict) else {}, resolved).items()
               if any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED_ON_RESUME)}  # fmt: skip
    if changed:
        k, (a, b) = next(iter(changed.items()))
        raise RunDirError(
            f"{run.path / 'config.yaml'}: {k}: expected {a!r} on --resume (the run's buffer and checkpoint were "
            f"made under it), got {b!r}: start a new run for that"
        )


def _diff(a: dict, b: dict, prefix: str = "") -> dict[str, tuple]:
    """Keys of ``a`` (the run's config.yaml) whose value ``b`` changes. A key ``a`` lacks is a setting
    newer than the run, at its default: not a change the user made."""
    out: dict[str, tuple] = {}
    for k in a:
        x, y = a[k], b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_diff(x, y, f"{prefix}{k}."))
        elif x != y:
            out[f"{prefix}{k}"] = (x, y)
    return out


def _read_summary(run: RunDir) -> dict:
    try:
        out = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("%s/summary.json: %s; it is written anew at the end", run.path, err)
        return {}
    return out if isinstance(out, dict) else {}
