"""robot_mbrl: model-based RL control stack for real robots, with safety gating."""

__version__ = "0.1.0"

#: gymnasium ids of the cart-pole twin -> kwargs of ``robot_mbrl.sim.gym_envs:CartpoleEnv``
GYM_ENV_IDS = {
    "robot_mbrl/CartpoleSwingup-v0": {"task": "swingup"},
    "robot_mbrl/CartpoleBalance-v0": {"task": "balance"},
}


def register_envs() -> None:
    """Register the twin's gymnasium ids (idempotent). String entry points: mujoco loads on make."""
    import gymnasium

    for env_id, kwargs in GYM_ENV_IDS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point="robot_mbrl.sim.gym_envs:CartpoleEnv", kwargs=kwargs)


register_envs()
