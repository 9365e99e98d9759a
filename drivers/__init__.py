"""Serial transports, framing and protocols (installed as robot_mbrl.drivers)."""
