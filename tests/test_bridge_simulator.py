"""The simulated firmware, spoken to directly with pyserial over its pseudo-terminal."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest
import serial

from firmware_bridge import wire
from firmware_bridge.simulator import FirmwareSimulator, PlungerModel
from firmware_bridge.wire import AckStatus, FrameParser, HoldReason, InjectorState, MsgType


class Port:
    """pyserial on the pty, plus a parser and a deadline-bounded reader."""

    def __init__(self, path: str) -> None:
        self.ser = serial.Serial(path, 115200, timeout=0.05)
        self.parser = FrameParser()
        self.queue: list[wire.Frame] = []  # parsed, not yet consumed by wait()

    def send(self, frame: wire.Frame) -> None:
        self.ser.write(wire.encode_frame(frame))

    def wait(self, pred, timeout_s: float = 2.0) -> wire.Frame:
        deadline = time.monotonic() + timeout_s
        while True:
            while self.queue:
                frame = self.queue.pop(0)
                if pred(frame):
                    return frame
            if time.monotonic() > deadline:
                raise AssertionError("expected frame did not arrive")
            self.queue += [i for i in self.parser.feed(self.ser.read(4096)) if isinstance(i, wire.Frame)]

    def ack_for(self, seq: int) -> tuple[int, AckStatus]:
        f = self.wait(lambda f: f.type == MsgType.ACK and wire.ACK_PAYLOAD.unpack(f.payload)[0] == seq)
        acked, status = wire.ACK_PAYLOAD.unpack(f.payload)
        return acked, AckStatus(status)

    def telemetry(self, pred=lambda t: True) -> wire.Telemetry:
        f = self.wait(lambda f: f.type == MsgType.TELEMETRY and pred(wire.Telemetry.unpack(f.payload)))
        return wire.Telemetry.unpack(f.payload)


@pytest.fixture
def sim(tmp_path: Path):
    s = FirmwareSimulator(link_dir=str(tmp_path), telemetry_hz=50).start()
    yield s
    s.stop()


def test_plunger_model_injects_holds_releases() -> None:
    m = PlungerModel(demand_ml_per_min=6.0)
    m.step(10.0)
    assert m.volume_ml == pytest.approx(1.0) and m.pressure_kpa > 0
    m.hold()
    m.step(10.0)
    assert m.volume_ml == pytest.approx(1.0) and m.flow_ml_per_min == 0
    assert m.state is InjectorState.HELD
    m.release()
    assert m.state is InjectorState.INJECTING
    m.fault(4)
    assert m.release() is AckStatus.REFUSED and m.state is InjectorState.FAULT
    m.clear_fault()
    assert m.state is InjectorState.HELD  # a cleared fault never restarts the motor by itself


def test_commands_acked_applied_deduplicated_and_stale(sim: FirmwareSimulator) -> None:
    port = Port(sim.port)
    t = port.telemetry()
    assert t.state is InjectorState.INJECTING
    port.send(wire.hold_frame(100, HoldReason.CLINICAL_ALERT, epoch=7))
    assert port.ack_for(100) == (100, AckStatus.APPLIED)
    held = port.telemetry(lambda t: t.state is InjectorState.HELD)
    assert held.flow_ul_per_min == 0
    port.send(wire.hold_frame(100, HoldReason.CLINICAL_ALERT, epoch=7))  # retransmit
    assert port.ack_for(100) == (100, AckStatus.DUPLICATE)
    port.send(wire.release_frame(102, epoch=7))
    assert port.ack_for(102) == (102, AckStatus.APPLIED)
    port.send(wire.hold_frame(101, HoldReason.CLINICAL_ALERT, epoch=7))  # overtaken: no re-hold
    assert port.ack_for(101) == (101, AckStatus.STALE)
    moving = port.telemetry(lambda t: t.state is InjectorState.INJECTING)
    later = port.telemetry(lambda t: t.volume_ul > moving.volume_ul)
    assert later.position_um > moving.position_um
    # a new host (new epoch) starts afresh: its first command applies whatever its seq
    port.send(wire.hold_frame(50, HoldReason.CLINICAL_ALERT, epoch=8))
    assert port.ack_for(50) == (50, AckStatus.APPLIED)
    assert port.telemetry(lambda t: t.state is InjectorState.HELD)
    port.ser.close()


def test_bad_frames_are_naked(sim: FirmwareSimulator) -> None:
    port = Port(sim.port)
    raw = struct.pack("<BBBHHB", 1, MsgType.HOLD, 0, 5, 1, HoldReason.CLINICAL_ALERT)
    raw += struct.pack("<I", zlib.crc32(raw) ^ 0x00010000)  # one bit off in the CRC
    port.ser.write(b"\x00" + wire.cobs_encode(raw) + b"\x00")
    nak = port.wait(lambda f: f.type == MsgType.NAK)
    assert wire.NAK_PAYLOAD.unpack(nak.payload) == (wire.NO_SEQ, wire.NakReason.BAD_CRC)
    assert sim.commands(MsgType.HOLD) == [] and sim.state is InjectorState.INJECTING
    port.ser.close()


def test_unplug_is_seen_by_pyserial_and_replug_reopens(sim: FirmwareSimulator) -> None:
    port = Port(sim.port)
    port.telemetry()
    sim.unplug()
    with pytest.raises(serial.SerialException):
        for _ in range(100):  # a hung-up tty reports EIO (or readiness with no data) at once
            port.ser.read(4096)
    port.ser.close()
    with pytest.raises(serial.SerialException):
        serial.Serial(sim.port)  # the by-id style link is gone while unplugged
    sim.replug()
    assert Path(sim.port).resolve() == Path(sim.pty_name)
    port = Port(sim.port)
    port.send(wire.hold_frame(7, HoldReason.REASSERT, epoch=9))
    assert port.ack_for(7) == (7, AckStatus.APPLIED)
    assert sim.stats.unplugs == 1 and sim.pty_name
    port.ser.close()


def test_tx_faults_reach_the_wire(sim: FirmwareSimulator) -> None:
    port = Port(sim.port)
    port.telemetry()
    rejects_before = port.parser.rejects
    sim.inject_tx("corrupt", 2, only=MsgType.TELEMETRY)
    sim.inject_tx("duplicate", 1, only=MsgType.TELEMETRY)
    seqs = [port.wait(lambda f: f.type == MsgType.TELEMETRY).seq for _ in range(6)]
    assert port.parser.rejects - rejects_before == 2
    assert len(seqs) != len(set(seqs))  # the duplicate arrived twice, byte for byte
    port.ser.close()


def test_link_interface_live_and_simulated(tmp_path: Path) -> None:
    from firmware_bridge.link import LinkError, SerialInjectorLink, SimulatedInjectorLink, make_link

    missing = make_link(str(tmp_path / "ttyACM9"))
    assert isinstance(missing, SerialInjectorLink) and not missing.connected
    with pytest.raises(LinkError, match="cannot open"):
        missing.connect()
    with pytest.raises(LinkError, match="not connected"):
        missing.read()

    link = make_link("sim")
    assert isinstance(link, SimulatedInjectorLink)
    try:
        link.connect()
        link.start()
        assert link.connected and link.fileno() is not None
        parser, frames = FrameParser(), []
        deadline = time.monotonic() + 2
        while not frames and time.monotonic() < deadline:
            frames = [f for f in parser.feed(link.read()) if isinstance(f, wire.Frame)]
        assert frames and frames[0].type == MsgType.TELEMETRY
        link.write(wire.encode_frame(wire.hold_frame(3, HoldReason.CLINICAL_ALERT)))
        assert link.simulator.wait_for(lambda r: any(x.frame.seq == 3 for x in r), 2.0)
        link.simulator.unplug()
        with pytest.raises(LinkError, match="went away"):
            for _ in range(100):
                link.read()
        assert not link.connected  # a dead port is closed, ready for connect() again
    finally:
        link.close_simulator()
