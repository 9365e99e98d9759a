"""Loop jitter: p50/p99/max of |tick start - scheduled start| for the paced RateLoop at 50 and 200 Hz.

Baseline in the same run: a naive relative-sleep loop (``sleep(period - work)``) whose error
accumulates as drift. Usage: python benchmarks/bench_loop.py [--seconds 10]

    python benchmarks/bench_loop.py --checkpoint RUN [--episodes 4]   # garbage-collector pauses
    python benchmarks/bench_loop.py --load 4 [--rt-priority 50]        # jitter under CPU load

With ``--load K``: the paced loop at 50 Hz while K other processes keep the CPUs busy (what else runs
on a robot's computer: drivers, cameras, a training job), at normal scheduling (the baseline) and at
``SCHED_FIFO`` ``--rt-priority`` (``loop.rt_priority``, ``runtime.loop.realtime``), same run.

With ``--checkpoint``: the pause a full cyclic-GC pass puts into a tick, in a process that holds a
trained controller and the twin (what ``robot-mbrl run`` holds), with the heap as the episode loop
keeps it (``runtime.loop.frozen_heap``) and without (the baseline, same process, same moment); then
the collections CPython itself started inside the ticks of N episodes, per generation, with the
longest pause and the slowest tick.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np

from robot_mbrl.runtime.loop import RateLoop


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def rate_loop(hz: float, seconds: float, work_s: float) -> dict:
    loop = RateLoop(hz, paced=True, max_ticks=int(hz * seconds))
    t0 = None
    for tick in loop:
        t0 = tick.start_s if t0 is None else t0
        busy(work_s)
    st = loop.stats()
    drift_ms = (tick.scheduled_s - (t0 + tick.index / hz)) * 1e3
    return {"jitter": st.jitter_ms, "overruns": st.overruns, "drift_ms": drift_ms, "ticks": st.ticks}


def naive_loop(hz: float, seconds: float, work_s: float) -> dict:
    period = 1.0 / hz
    n = int(hz * seconds)
    t0 = time.monotonic()
    starts = []
    for _ in range(n):
        s = time.monotonic()
        starts.append(s)
        busy(work_s)
        time.sleep(max(0.0, period - (time.monotonic() - s)))
    err = np.abs(np.asarray(starts) - (t0 + np.arange(n) * period)) * 1e3
    return {
        "jitter": {
            "p50": float(np.median(err)),
            "p99": float(np.percentile(err, 99)),
            "max": float(err.max()),
        },
        "drift_ms": float(starts[-1] - (t0 + (n - 1) * period)) * 1e3,
        "ticks": n,
    }


def _full_pass_ms(repeats: int = 7) -> np.ndarray:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


def gc_pauses(checkpoint: str, episodes: int) -> None:
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.loop import frozen_heap
    from robot_mbrl.runtime.rundir import Tally

    cfg = load_config(f"{checkpoint}/config.yaml", [])
    robot, task = make_robot(cfg), make_task(cfg)
    judge = make_judge(task, robot)
    ctrl = MPCAgent.load(checkpoint, cfg, robot.spec, task).controller()
    pauses: list[tuple[int, float]] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses.append((info["generation"], (time.perf_counter() - started.pop()) * 1e3))

    with robot:
        run_episode(
            robot,
            judge,
            ctrl,
            episode=0,
            max_steps=cfg.task.episode_steps,
            seed=0,
            paced=False,
            tally=Tally(),
        )  # fmt: skip  (warm-up: the process as a run holds it)
        objects = len(gc.get_objects())
        open_ms = _full_pass_ms()
        with frozen_heap():
            frozen_ms = _full_pass_ms()
        gc.callbacks.append(on_gc)
        tally, steps = Tally(), []
        try:
            for ep in range(episodes):
                res = run_episode(robot, judge, ctrl, episode=ep, max_steps=cfg.task.episode_steps, seed=ep + 1,
                                  paced=False, tally=tally)  # fmt: skip
                steps.append(res.steps)
        finally:
            gc.callbacks.remove(on_gc)
    print(f"\n## Garbage-collector pauses in a tick (`{checkpoint}`, {objects} tracked objects, Python "
          f"{platform.python_version()})\n")  # fmt: skip
    print("| heap | full pass p50 (ms) | max (ms) |")
    print("|---|---|---|")
    print(f"| as it is (baseline) | {np.median(open_ms):.1f} | {open_ms.max():.1f} |")
    print(f"| frozen (the episode loop) | {np.median(frozen_ms):.3f} | {frozen_ms.max():.3f} |")
    ratio = np.median(open_ms) / max(float(np.median(frozen_ms)), 1e-3)  # the timer's floor: 1 us
    print(f"\nbaseline / frozen: {'>' if np.median(frozen_ms) < 1e-3 else ''}{ratio:.0f}x. Collections CPython "
          f"started inside {episodes} episodes ({sum(steps)} ticks, heap frozen):")  # fmt: skip
    for g in (0, 1, 2):
        d = [ms for gen, ms in pauses if gen == g]
        print(f"- generation {g}: {len(d)}" + (f", longest {max(d):.2f} ms" if d else ""))
    print(f"- deadline misses {tally.deadline_misses}")


def _spin() -> None:
    while True:
        pass


def under_load(load: int, priority: int, seconds: float, work_ms: float) -> None:
    import multiprocessing as mp

    from robot_mbrl.runtime.loop import realtime

    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in hogs:
        p.start()
    try:
        rows = [("normal scheduling (baseline)", rate_loop(50.0, seconds, work_ms / 1e3))]
        with realtime(priority) as granted:
            if not granted:
                raise SystemExit(
                    f"--rt-priority {priority}: SCHED_FIFO refused (needs CAP_SYS_NICE or an rtprio limit)"
                )
            rows.append((f"SCHED_FIFO {priority}", rate_loop(50.0, seconds, work_ms / 1e3)))
    finally:
        for p in hogs:
            p.terminate()
    print(f"## Loop jitter under CPU load ({platform.node()}, {os.cpu_count()} CPUs, {load} busy processes, "
          f"{time.strftime('%Y-%m-%d')}, 50 Hz, {work_ms} ms work/tick, {seconds:.0f} s per row)\n")  # fmt: skip
    print("| scheduling | ticks | start error p50 / p99 / max (ms) | overruns |")
    print("|---|---|---|---|")
    for name, r in rows:
        j = r["jitter"]
        print(
            f"| {name} | {r['ticks']} | {j['p50']:.3f} / {j['p99']:.3f} / {j['max']:.3f} | {r['overruns']} |"
        )
    base, rt = rows[0][1]["jitter"], rows[1][1]["jitter"]
    print(f"\np99 start error: baseline / SCHED_FIFO {base['p99'] / max(rt['p99'], 1e-3):.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--work-ms", type=float, default=2.0, help="simulated work per tick")
    ap.add_argument("--checkpoint", help="a run directory: measure GC pauses instead of jitter")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--load", type=int, default=0, help="busy processes competing for the CPUs")
    ap.add_argument("--rt-priority", type=int, default=50)
    args = ap.parse_args()
    if args.load < 0:
        ap.error(f"--load: expected a number of busy processes >= 0, got {args.load}")
    if args.load:
        under_load(args.load, args.rt_priority, args.seconds, args.work_ms)
        return
    if args.checkpoint:
        gc_pauses(args.checkpoint, args.episodes)
        return
    print(
        f"# loop jitter, {platform.node()} {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}, {args.seconds:.0f} s per row, {args.work_ms} ms work/tick"
    )
    print("| loop | rate | ticks | start error p50 / p99 / max (ms) | drift at end (ms) | overruns |")
    print("|---|---|---|---|---|---|")
    for hz in (50.0, 200.0):
        r = rate_loop(hz, args.seconds, args.work_ms / 1e3)
        j = r["jitter"]
        print(
            f"| RateLoop (absolute deadlines) | {hz:.0f} Hz | {r['ticks']} | {j['p50']:.3f} / {j['p99']:.3f} / {j['max']:.3f} "
            f"| {r['drift_ms']:.3f} | {r['overruns']} |"
        )
        b = naive_loop(hz, args.seconds, args.work_ms / 1e3)
        j = b["jitter"]
        print(
            f"| naive relative sleep (baseline) | {hz:.0f} Hz | {b['ticks']} | {j['p50']:.3f} / {j['p99']:.3f} / {j['max']:.3f} "
            f"| {b['drift_ms']:.3f} | - |"
        )


if __name__ == "__main__":
    main()
