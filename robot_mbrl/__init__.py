"""robot_mbrl: model-based RL control stack for real robots, with safety gating."""

__version__ = "0.1.0"
