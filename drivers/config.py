"""Serial link configuration (typed, frozen). Deliberately free of pyserial: the core may import it."""

from __future__ import annotations

from dataclasses import dataclass

from robot_mbrl.typedconfig import param


@dataclass(frozen=True)
class SerialConfig:
    """How to reach an MCU over a serial link and how to map its channels onto the robot spec."""

    port: str = param("/dev/robot-mcu", "device path or pyserial URL (socket://127.0.0.1:PORT, loop://)")
    baud: int = param(1_000_000, "baud rate (ignored by socket:// and loop://)", gt=0)
    read_timeout_s: float | None = param(
        None, "blocking read timeout; null = derived from the baud rate and the frame size", gt=0
    )
    write_timeout_s: float = param(
        0.005,
        "a write that blocks longer than this means the link is down (a device that stopped reading); "
        "the control tick waits at most this long",
        gt=0,
    )
    max_frame_bytes: int = param(256, "longest frame expected on the wire (for timeouts and resync)", gt=8)
    retries: int = param(3, "attempts for request/response exchanges (handshake, ACKs)", ge=1)
    backoff_initial_s: float = param(0.05, "first reconnect delay; doubles after each failure", gt=0)
    backoff_max_s: float = param(2.0, "reconnect delay cap", gt=0)
    handshake_timeout_s: float = param(0.25, "wait for HELLO_ACK per attempt", gt=0)
    watchdog_ms: int = param(100, "device brakes when no valid COMMAND arrives for this long", gt=0, lt=65536)
    stale_periods: float = param(
        2.0, "observation is STALE when no STATE arrived for this many periods", gt=0
    )
    link_timeout_s: float | None = param(
        5.0,
        "read() raises LinkLost once the device has been unreachable, unconfigured or e-stop-held "
        "(by the device, not this host) for this long: the job ends with one line instead of "
        "counting ticks without a robot; null = never",
        gt=0,
    )
    obs_from_sensor: tuple[int, ...] = param(
        (), "spec obs channel i reads device sensor obs_from_sensor[i]; empty = identity"
    )
    act_to_actuator: tuple[int, ...] = param(
        (), "spec action channel i drives device actuator act_to_actuator[i]; empty = identity"
    )

    def validate(self) -> None:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        for name in ("obs_from_sensor", "act_to_actuator"):
            idx = getattr(self, name)
            if any(i < 0 for i in idx) or len(set(idx)) != len(idx):
                raise ValueError(f"{name} must hold distinct non-negative indices")

    def frame_time_s(self, n_bytes: int | None = None) -> float:
        """Time to put ``n_bytes`` (default: a max-size frame) on the wire, 10 bits per byte (8N1)."""
        return (self.max_frame_bytes if n_bytes is None else n_bytes) * 10.0 / self.baud

    def derived_read_timeout_s(self) -> float:
        """Explicit ``read_timeout_s``, else 4 frame times plus 5 ms for USB/OS latency."""
        if self.read_timeout_s is not None:
            return self.read_timeout_s
        return 4.0 * self.frame_time_s() + 0.005
