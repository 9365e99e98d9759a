"""Default YAML configs shipped with the package (installed as robot_mbrl.configs)."""
