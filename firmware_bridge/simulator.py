"""Simulated injector firmware speaking the serial protocol over a pseudo-terminal.

The bridge opens the pty's slave side with pyserial, exactly as it would open a USB-CDC
port. The simulator publishes a stable symlink to the slave (like udev's
/dev/serial/by-id/ links), so "unplug" can remove it and "replug" can point it at a fresh pty.

    python -m firmware_bridge.simulator            # prints the port path, runs until Ctrl-C

Link faults for tests (drop, corrupt, duplicate, reorder, truncate, silence, unplug/replug)
are injected on the simulator side, on real bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge import wire
from firmware_bridge.wire import AckStatus, Frame, InjectorState, MsgType, Reject

log = logging.getLogger("firmware_bridge.simulator")


@dataclass
class PlungerModel:
    """A syringe driven by a motor: injects at the demanded flow unless held or faulted."""

    demand_ml_per_min: float = 3.0
    capacity_ml: float = 10.0
    bore_area_mm2: float = 176.7  # 15 mm bore: 1 mL is 5.66 mm of travel
    volume_ml: float = 0.0
    pressure_kpa: float = 0.0
    state: InjectorState = InjectorState.INJECTING
    fault_code: int = 0

    @property
    def flow_ml_per_min(self) -> float:
        return self.demand_ml_per_min if self.state is InjectorState.INJECTING else 0.0

    @property
    def position_mm(self) -> float:
        return self.volume_ml * 1000.0 / self.bore_area_mm2

    def step(self, dt_s: float) -> None:
        if self.state is InjectorState.INJECTING:
            self.volume_ml = min(self.capacity_ml, self.volume_ml + self.flow_ml_per_min * dt_s / 60)
            if self.volume_ml >= self.capacity_ml:
                self.state = InjectorState.IDLE
        # cement back-pressure rises with flow and relaxes (tau 0.3 s) once the plunger stops
        target = 300.0 + 150.0 * self.flow_ml_per_min if self.flow_ml_per_min > 0 else 0.0
        self.pressure_kpa += (target - self.pressure_kpa) * min(1.0, dt_s / 0.3)

    def hold(self) -> AckStatus:
        if self.state is InjectorState.FAULT:
            return AckStatus.APPLIED  # a faulted motor is already stopped
        self.state = InjectorState.HELD
        return AckStatus.APPLIED

    def release(self) -> AckStatus:
        if self.state is InjectorState.FAULT:
            return AckStatus.REFUSED
        if self.state is InjectorState.HELD:
            injecting = self.demand_ml_per_min > 0 and self.volume_ml < self.capacity_ml
            self.state = InjectorState.INJECTING if injecting else InjectorState.IDLE
        return AckStatus.APPLIED

    def fault(self, code: int) -> None:
        self.state, self.fault_code = InjectorState.FAULT, code

    def clear_fault(self) -> None:
        if self.state is InjectorState.FAULT:
            self.state, self.fault_code = InjectorState.HELD, 0  # a cleared fault stays stopped

    def telemetry(self, uptime_ms: int) -> wire.Telemetry:
        return wire.Telemetry(
            position_um=round(self.position_mm * 1000),
            volume_ul=round(self.volume_ml * 1000),
            pressure_pa=round(self.pressure_kpa * 1000),
            flow_ul_per_min=round(self.flow_ml_per_min * 1000),
            state=self.state,
            fault_code=self.fault_code,
            uptime_ms=uptime_ms,
        )


@dataclass(frozen=True)
class Received:
    """A command frame the firmware accepted (CRC good), with the time its bytes were read."""

    rx_mono_ns: int
    frame: Frame
    status: AckStatus | None  # None when dropped by an rx fault before processing


@dataclass
class _Fault:
    kind: str  # drop | corrupt | duplicate | reorder | truncate
    remaining: int
    only: MsgType | None = None


TX_FAULTS = ("drop", "corrupt", "duplicate", "reorder", "truncate")
RX_FAULTS = ("drop", "corrupt")


@dataclass
class SimStats:
    commands: int = 0
    naks_sent: int = 0
    rx_rejects: int = 0
    tx_frames: int = 0
    tx_overruns: int = 0  # bytes the pty would not take (nobody reading)
    unplugs: int = 0


class FirmwareSimulator:
    """The injector firmware: a plunger model behind the serial protocol, on its own thread."""

    def __init__(
        self,
        *,
        telemetry_hz: float = 50.0,
        model: PlungerModel | None = None,
        link_dir: str | None = None,
        host_timeout_s: float | None = None,
    ) -> None:
        self.model = model or PlungerModel()
        # firmware-side watchdog: no command from the host for this long -> hold by itself
        self.host_timeout_s = host_timeout_s
        self._last_host_rx = time.monotonic()
        self.self_holds = 0
        self.telemetry_period_s = 1.0 / telemetry_hz
        self._own_dir = link_dir is None
        self._dir = link_dir or tempfile.mkdtemp(prefix="injector-sim-")
        self.port = os.path.join(self._dir, "injector")  # stable symlink the bridge opens
        self.stats = SimStats()
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._master: int | None = None
        self._slave: int | None = None
        self.pty_name = ""
        self._parser = wire.FrameParser()
        self._tx_seq = 0
        self.gate = wire.CommandGate()  # duplicate / order / epoch rules
        self._tx_faults: list[_Fault] = []
        self._rx_faults: list[_Fault] = []
        self._reordered: bytes | None = None
        self.silent = False
        self.host_hold_latched = False
        self._requests: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FirmwareSimulator:
        self._plug()
        self._thread = threading.Thread(target=self._run, name="injector-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread:
            self._thread.join(timeout=2.0)
        self._unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FirmwareSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ faults (any thread)
    def inject_tx(self, kind: str, count: int = 1, only: MsgType | None = None) -> None:
        """Apply `kind` to the next `count` frames the firmware sends (optionally one type)."""
        if kind not in TX_FAULTS:
            raise ValueError(f"unknown tx fault {kind!r}; choose from {TX_FAULTS}")
        self._call(lambda: self._tx_faults.append(_Fault(kind, count, only)))

    def inject_rx(self, kind: str, count: int = 1) -> None:
        """Drop or corrupt the next `count` frames from the host before the firmware parses them."""
        if kind not in RX_FAULTS:
            raise ValueError(f"unknown rx fault {kind!r}; choose from {RX_FAULTS}")
        self._call(lambda: self._rx_faults.append(_Fault(kind, count)))

    def inject_bytes(self, data: bytes) -> None:
        """Raw bytes onto the line (garbage, half frames)."""
        self._call(lambda: self._write(data))

    def set_silent(self, silent: bool) -> None:
        """Firmware stops transmitting anything (telemetry and ACKs) but keeps running."""
        self._call(lambda: setattr(self, "silent", silent))

    def unplug(self) -> None:
        self._call(self._unplug)

    def replug(self) -> None:
        self._call(self._plug)

    def reboot(self) -> None:
        """The MCU restarts while the cable stays in: seqs, uptime and dedup state start over,
        and the motor comes up stopped (idle)."""

        def _reboot() -> None:
            self._tx_seq = 0
            self._t0 = time.monotonic()
            self.gate.reset()
            self._parser = wire.FrameParser()
            self.model.state, self.model.fault_code = InjectorState.IDLE, 0
            self._last_host_rx = time.monotonic()

        self._call(_reboot)

    def trigger_fault(self, code: int = 1) -> None:
        self._call(lambda: self.model.fault(code))

    def clear_fault(self) -> None:
        self._call(self.model.clear_fault)

    # ------------------------------------------------------------ observation
    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float) -> bool:
        """Block until predicate(received) holds, or the deadline passes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.received), timeout=timeout_s)

    def commands(self, mtype: MsgType) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.frame.type == mtype and r.status is not None]

    @property
    def state(self) -> InjectorState:
        return self.model.state

    # ------------------------------------------------------------ the firmware thread
    def _call(self, fn: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            fn()
            return
        done = threading.Event()
        self._requests.append((fn, done))
        os.write(self._wake_w, b"x")
        done.wait(timeout=2.0)

    def _run(self) -> None:
        next_tick = time.monotonic()
        last = next_tick
        while not self._stop.is_set():
            fds = [self._wake_r] + ([self._master] if self._master is not None else [])
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except (OSError, ValueError):  # fd closed under us by unplug: go round again
                readable = []
            rx_ns = time.monotonic_ns()
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
                while self._requests:
                    fn, done = self._requests.popleft()
                    try:
                        fn()
                    finally:
                        done.set()
            if self._master is not None and self._master in readable:
                try:
                    data = os.read(self._master, 4096)
                except OSError:
                    data = b""  # EIO: no slave open right now
                if data:
                    self._on_bytes(data, rx_ns)
            now = time.monotonic()
            if (
                self.host_timeout_s is not None
                and now - self._last_host_rx > self.host_timeout_s
                and self.model.state is InjectorState.INJECTING
            ):
                self.model.hold()
                with self._cond:
                    self.self_holds += 1
                    self._cond.notify_all()
                log.warning("no command from the host for %.0f ms: holding", (now - self._last_host_rx) * 1000)
            if now >= next_tick:
                self.model.step(now - last)
                last = now
                self._send(wire.telemetry_frame(self._next_seq(), self.model.telemetry(self._uptime_ms())))
                next_tick += self.telemetry_period_s
                if next_tick < now:  # fell behind (loaded machine): don't burst to catch up
                    next_tick = now + self.telemetry_period_s

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    def _next_seq(self) -> int:
        self._tx_seq = (self._tx_seq + 1) & 0xFFFF
        return self._tx_seq

    def _on_bytes(self, data: bytes, rx_ns: int) -> None:
        for item in self._parser.feed(data):
            if isinstance(item, Reject):
                self.stats.rx_rejects += 1
                log.debug("rx reject: %s", item.detail)
                self._send(wire.nak_frame(self._next_seq(), item.seq, item.reason))
                self.stats.naks_sent += 1
                continue
            fault = self._take(self._rx_faults, item.type)
            if fault == "drop":
                self._record(Received(rx_ns, item, None))
                continue
            if fault == "corrupt":  # as if a bit flipped on the wire: CRC fails, NAK
                self.stats.rx_rejects += 1
                self._send(wire.nak_frame(self._next_seq(), wire.NO_SEQ, wire.NakReason.BAD_CRC))
                self.stats.naks_sent += 1
                continue
            self._on_frame(item, rx_ns)

    def _on_frame(self, frame: Frame, rx_ns: int) -> None:
        if frame.type not in wire.COMMANDS:
            self._send(wire.nak_frame(self._next_seq(), frame.seq, wire.NakReason.UNKNOWN_TYPE))
            return
        self.stats.commands += 1
        self._last_host_rx = time.monotonic()
        status = self.gate.admit(frame)
        if status is None:  # admitted: apply it
            if frame.type is MsgType.HEARTBEAT:
                self.host_hold_latched = bool(frame.payload[0])
                status = AckStatus.APPLIED
            elif frame.type is MsgType.HOLD:
                status = self.model.hold()
            else:
                status = self.model.release()
            self.gate.done(frame.seq, status)
        self._record(Received(rx_ns, frame, status))
        self._send(wire.ack_frame(self._next_seq(), frame.seq, status))

    def _record(self, received: Received) -> None:
        with self._cond:
            self.received.append(received)
            self._cond.notify_all()

    @staticmethod
    def _take(faults: list[_Fault], mtype: int) -> str | None:
        for fault in faults:
            if fault.only is None or fault.only == mtype:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.remove(fault)
                return fault.kind
        return None

    def _send(self, frame: Frame) -> None:
        if self.silent or self._master is None:
            return
        data = wire.encode_frame(frame)
        fault = self._take(self._tx_faults, frame.type)
        if fault == "drop":
            return
        if fault == "corrupt":
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x5A  # never 0x00-> stays a single frame, CRC catches it
            if buf[len(buf) // 2] == 0:
                buf[len(buf) // 2] = 0x01
            data = bytes(buf)
        elif fault == "duplicate":
            data = data + data
        elif fault == "truncate":
            data = data[: len(data) // 2]
        elif fault == "reorder":
            self._reordered = data  # goes out after the next frame
            return
        self.stats.tx_frames += 1
        self._write(data)
        if self._reordered is not None:
            held, self._reordered = self._reordered, None
            self._write(held)

    def _write(self, data: bytes) -> None:
        if self._master is None:
            return
        try:
            os.write(self._master, data)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EIO):
                self.stats.tx_overruns += 1
            else:
                raise

    # ------------------------------------------------------------ the cable
    def _plug(self) -> None:
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing before the bridge configures the port
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.pty_name = os.ttyname(slave)
        tmp = self.port + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.pty_name, tmp)
        os.replace(tmp, self.port)  # atomic: the bridge never sees a half-made link
        self._parser = wire.FrameParser()

    def _unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._master is not None:
            self.stats.unplugs += 1
        self._master = self._slave = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge.simulator",
        description="Simulated cement-injector firmware on a pseudo-terminal. Type commands on "
        "stdin: fault, clear, unplug, replug, silent, talk, quit.",
    )
    parser.add_argument("--telemetry-hz", type=float, default=50.0)
    parser.add_argument("--flow", type=float, default=3.0, help="demanded flow, mL/min")
    parser.add_argument("--link-dir", help="folder for the stable 'injector' symlink")
    parser.add_argument(
        "--host-timeout",
        type=float,
        default=1.0,
        metavar="S",
        help="hold by itself when no command came from the host for S seconds "
        "(firmware watchdog; 0 disables; default 1.0)",
    )
    args = parser.parse_args(argv)
    if not 1.0 <= args.telemetry_hz <= 1000.0:
        print("simulator: error: --telemetry-hz must be within 1..1000", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sim = FirmwareSimulator(
        telemetry_hz=args.telemetry_hz,
        model=PlungerModel(demand_ml_per_min=args.flow),
        link_dir=args.link_dir,
        host_timeout_s=args.host_timeout if args.host_timeout > 0 else None,
    )

    def _term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: same clean stop as Ctrl-C

    signal.signal(signal.SIGTERM, _term)
    sim.start()
    print(sim.port, flush=True)
    print(f"simulator: port {sim.port} -> {sim.pty_name}", file=sys.stderr, flush=True)
    actions: dict[str, Callable[[], None]] = {
        "fault": sim.trigger_fault,
        "clear": sim.clear_fault,
        "unplug": sim.unplug,
        "replug": sim.replug,
        "silent": lambda: sim.set_silent(True),
        "talk": lambda: sim.set_silent(False),
    }
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd in actions:
                actions[cmd]()
                print(f"simulator: {cmd} done; state {sim.state.name.lower()}", file=sys.stderr)
            elif cmd:
                print(f"simulator: unknown command {cmd!r}", file=sys.stderr)
        else:
            threading.Event().wait()  # stdin closed (e.g. run in background): run until killed
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
