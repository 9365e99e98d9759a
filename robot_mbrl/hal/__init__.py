"""Hardware abstraction layer: the `Robot` interface, its spec and observations."""

from robot_mbrl.hal.robot import (
    BoxConstraint,
    Channel,
    Fault,
    Observation,
    Robot,
    RobotSpec,
    stop_on_signals,
)

__all__ = ["BoxConstraint", "Channel", "Fault", "Observation", "Robot", "RobotSpec", "stop_on_signals"]
