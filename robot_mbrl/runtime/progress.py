"""A progress bar for long CLI jobs (tqdm on stderr), silent when disabled or not a terminal job.

The control loop only counts (:meth:`Progress.tick`: an integer under a lock); a daemon thread draws
the bar every ``refresh_s``. A write to a terminal can block for as long as the terminal wants (an
operator's Ctrl-S, a stalled ssh session, a pipe nobody reads): never inside a tick.
"""

from __future__ import annotations

import threading
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, file: TextIO | None = None,
                 refresh_s: float = 0.2):  # fmt: skip
        self._bar = None
        self._last = 0
        self._pending = 0
        self._lock = threading.Lock()  # the count (held for an integer swap only)
        self._drawing = threading.Lock()  # the bar (tqdm is drawn from one thread at a time)
        self._post: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, file=file)
            self._thread = threading.Thread(
                target=self._draw, args=(refresh_s,), name="progress", daemon=True
            )
            self._thread.start()

    def tick(self, steps_in_episode: int) -> None:
        """Called with the step count inside the current episode; advances by the difference."""
        if self._bar is None:
            return
        delta = steps_in_episode - self._last if steps_in_episode > self._last else steps_in_episode
        self._last = steps_in_episode
        with self._lock:
            self._pending += max(delta, 0)

    def post(self, **values: Any) -> None:
        """Between episodes: the latest figures (drawn by the caller, not in a tick)."""
        self._last = 0
        if self._bar is None:
            return
        self._post.update({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in values.items()})
        with self._drawing:
            self._advance()
            self._bar.set_postfix(self._post, refresh=True)

    def _advance(self) -> None:
        with self._lock:
            n, self._pending = self._pending, 0
        if n and self._bar is not None:
            self._bar.update(n)

    def _draw(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._drawing:
                self._advance()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._advance()
            self._bar.close()
