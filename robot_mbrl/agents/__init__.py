"""Agents: what combines models, planner, value and gate into a controller that learns."""
