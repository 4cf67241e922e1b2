"""Injector link: one device interface (connect/start/read/stop), chosen by config.

- `SerialInjectorLink`: the live link, pyserial on a real port (USB-CDC /dev/ttyACM*, UART
  /dev/ttyUSB*, /dev/serial/by-id/...) or any pseudo-terminal path.
- `SimulatedInjectorLink`: starts the firmware simulator on a pseudo-terminal in this process
  and talks to it through the same pyserial code path, so "sim" exercises the live code.

The link moves bytes only; framing lives in `wire`, policy in `bridge`.
"""

from __future__ import annotations

import contextlib
import logging

import serial

from firmware_bridge.simulator import FirmwareSimulator

log = logging.getLogger("firmware_bridge.link")


class LinkError(Exception):
    """The port cannot be opened, or went away (unplugged, hung up)."""


class InjectorLink:
    """PLUS-style device interface. Not thread-safe: owned by the bridge loop."""

    name = "link"

    def connect(self) -> None:
        """Open the device; raises LinkError when it is not there (yet)."""
        raise NotImplementedError

    def start(self) -> None:
        """Begin a session: drop whatever stale bytes sat in the buffers."""
        raise NotImplementedError

    def read(self) -> bytes:
        """Bytes available now (possibly none); raises LinkError when the device is gone."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Queue bytes for the device; raises LinkError when the device is gone."""
        raise NotImplementedError

    def stop(self) -> None:
        """Close the device. Safe to call twice."""
        raise NotImplementedError

    def fileno(self) -> int | None:
        """fd to poll for readability while connected, else None."""
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        return self.fileno() is not None


class SerialInjectorLink(InjectorLink):
    def __init__(self, port: str, baudrate: int = 115200) -> None:
        self.port = port
        self.name = port
        self.baudrate = baudrate
        self._serial: serial.Serial | None = None

    def connect(self) -> None:
        if self._serial is not None:
            return
        try:
            # timeout=0: read() returns what is there; write_timeout bounds a stuck port
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0, write_timeout=0.05, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as err:
            raise LinkError(f"cannot open {self.port}: {err}") from None

    def start(self) -> None:
        ser = self._require()
        try:
            ser.reset_input_buffer()
        except (serial.SerialException, OSError) as err:
            self.stop()
            raise LinkError(f"{self.port}: {err}") from None

    def read(self) -> bytes:
        ser = self._require()
        try:
            data = ser.read(max(1, ser.in_waiting))
        except (serial.SerialException, OSError) as err:
            self.stop()
            raise LinkError(f"{self.port} went away: {err}") from None
        return bytes(data)

    def write(self, data: bytes) -> None:
        ser = self._require()
        try:
            ser.write(data)
        except (serial.SerialException, serial.SerialTimeoutException, OSError) as err:
            self.stop()
            raise LinkError(f"{self.port} write failed: {err}") from None

    def stop(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.close()
            self._serial = None

    def fileno(self) -> int | None:
        return self._serial.fileno() if self._serial is not None else None

    def _require(self) -> serial.Serial:
        if self._serial is None:
            raise LinkError(f"{self.port} is not connected")
        return self._serial


class SimulatedInjectorLink(SerialInjectorLink):
    """A FirmwareSimulator on a pty, reached through the live serial path."""

    def __init__(self, simulator: FirmwareSimulator | None = None) -> None:
        self.simulator = simulator or FirmwareSimulator()
        self._owns = simulator is None
        if self._owns:
            self.simulator.start()
        super().__init__(self.simulator.port)
        self.name = f"sim:{self.simulator.port}"

    def close_simulator(self) -> None:
        self.stop()
        if self._owns:
            self.simulator.stop()


def make_link(spec: str, baudrate: int = 115200) -> InjectorLink:
    """`sim` -> simulated injector; anything else is a serial port path."""
    if spec == "sim":
        return SimulatedInjectorLink()
    return SerialInjectorLink(spec, baudrate)
