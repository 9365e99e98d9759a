"""The thread lifecycle every emulated device shares: start/stop, context manager, link closed on stop."""

from __future__ import annotations

import threading
from typing import Any


class ThreadedDevice:
    """Base for emulators: subclasses set ``self.link`` and implement ``_run`` (loop until ``_stop``)."""

    link: Any
    thread_name = "device"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> str:
        return self.link.port

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def hang(self) -> None:
        """The firmware hangs: the device stops reading and sending, and the link stays up (a USB CDC
        endpoint nobody drains). :meth:`stop` still closes the link."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def stop(self) -> None:
        self.hang()
        self.link.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
