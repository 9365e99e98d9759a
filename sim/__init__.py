"""MuJoCo twins, their MJCF models and fault/shift schedules (installed as robot_mbrl.sim)."""
