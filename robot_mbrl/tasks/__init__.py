"""Tasks: what the controller should achieve (batched reward, termination, constraints)."""

from robot_mbrl.tasks.base import Task
from robot_mbrl.tasks.cartpole import CartpoleTask

__all__ = ["Task", "CartpoleTask"]
