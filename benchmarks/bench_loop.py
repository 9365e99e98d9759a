"""Loop jitter: p50/p99/max of |tick start - scheduled start| for the paced RateLoop at 50 and 200 Hz.

Baseline in the same run: a naive relative-sleep loop (``sleep(period - work)``) whose error
accumulates as drift. Usage: python benchmarks/bench_loop.py [--seconds 10]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--work-ms", type=float, default=2.0, help="simulated work per tick")
    args = ap.parse_args()
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
