"""Device emulators, fault injection and HIL scenarios (installed as robot_mbrl.hil)."""
