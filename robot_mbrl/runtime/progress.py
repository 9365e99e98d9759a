"""A progress bar for long CLI jobs (tqdm on stderr), silent when disabled or not a terminal job."""

from __future__ import annotations

from typing import Any


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
        self._last = 0
        self._post: dict[str, Any] = {}

    def tick(self, steps_in_episode: int) -> None:
        """Called with the step count inside the current episode; advances by the difference."""
        if self._bar is None:
            return
        delta = steps_in_episode - self._last if steps_in_episode > self._last else steps_in_episode
        self._last = steps_in_episode
        self._bar.update(max(delta, 0))

    def post(self, **values: Any) -> None:
        self._last = 0
        if self._bar is None:
            return
        self._post.update({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in values.items()})
        self._bar.set_postfix(self._post, refresh=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
