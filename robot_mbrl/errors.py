"""Errors a user can fix, which the CLI reports as one line (exit code 2) instead of a traceback."""

from __future__ import annotations

from robot_mbrl.data.buffer import BufferFileError
from robot_mbrl.drivers.framing import ProtocolError
from robot_mbrl.models.checkpoint import CheckpointError
from robot_mbrl.runtime.deadline import PlannerHung

# ConnectionError covers the serial link (drivers.transport.LinkDown, HandshakeError) without
# importing pyserial here.
USER_ERRORS: tuple[type[BaseException], ...] = (
    BufferFileError,
    CheckpointError,
    ProtocolError,
    ConnectionError,
    PlannerHung,  # not the user's to fix, but one line: the robot is safe-stopped, the run resumable
)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists without --resume, or is not a run)."""


USER_ERRORS = (*USER_ERRORS, RunDirError)
