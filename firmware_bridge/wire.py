"""Serial wire protocol to the injector firmware: COBS framing, header, CRC-32, payloads.

Pure functions and a streaming parser; no I/O, no clocks. See docs/firmware-protocol.md.

On the wire every frame is ``0x00 || COBS(header || payload || crc32) || 0x00``.
Header (little-endian, 7 bytes): version u8, type u8, epoch u8, seq u16, length u16.
CRC-32 (IEEE 802.3, as zlib.crc32) over header and payload, little-endian u32.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

PROTOCOL_VERSION = 1
DELIMITER = 0x00
HEADER = struct.Struct("<BBBHH")
CRC = struct.Struct("<I")
MAX_PAYLOAD = 64
MAX_RAW = HEADER.size + MAX_PAYLOAD + CRC.size
# COBS adds one byte per 254 plus one; anything longer without a delimiter is garbage
MAX_ENCODED = MAX_RAW + MAX_RAW // 254 + 2

# Host link epoch: commands carry 1..255, a new value for every (re)connect or resync; the
# firmware starts its duplicate/order bookkeeping afresh when the epoch changes. 0: device frames.
NO_EPOCH = 0


class MsgType(enum.IntEnum):
    # host -> firmware commands (each is ACKed or NAKed)
    HOLD = 0x01
    RELEASE = 0x02
    HEARTBEAT = 0x03
    # firmware -> host
    TELEMETRY = 0x10
    ACK = 0x20
    NAK = 0x21


COMMANDS = frozenset({MsgType.HOLD, MsgType.RELEASE, MsgType.HEARTBEAT})


class InjectorState(enum.IntEnum):
    IDLE = 0
    INJECTING = 1
    HELD = 2
    FAULT = 3


class HoldReason(enum.IntEnum):
    CLINICAL_ALERT = 1  # posterior/venous leak alert
    GUIDANCE_LOST = 2  # guidance heartbeat missing
    REASSERT = 3  # latched hold re-sent after reconnect or state mismatch


class AckStatus(enum.IntEnum):
    APPLIED = 0  # command applied now
    DUPLICATE = 1  # same seq seen before: re-ACKed, not applied twice
    STALE = 2  # older than the last applied HOLD/RELEASE: ACKed, ignored
    REFUSED = 3  # firmware cannot apply it (e.g. RELEASE while in fault)


class NakReason(enum.IntEnum):
    BAD_CRC = 1
    BAD_FRAMING = 2  # COBS error, short frame, length mismatch, oversize
    BAD_VERSION = 3
    UNKNOWN_TYPE = 4
    BAD_PAYLOAD = 5


# payload layouts (little-endian)
HOLD_PAYLOAD = struct.Struct("<B")  # HoldReason
HEARTBEAT_PAYLOAD = struct.Struct("<B")  # host hold_latched flag (0/1)
ACK_PAYLOAD = struct.Struct("<HB")  # acked seq, AckStatus
NAK_PAYLOAD = struct.Struct("<HB")  # seq if the header was readable else 0xFFFF, NakReason
# position um (i32), delivered volume uL (u32), pressure Pa (i32), flow uL/min (i32),
# state u8, fault code u8, firmware uptime ms (u32)
TELEMETRY_PAYLOAD = struct.Struct("<iIiiBBI")
PAYLOAD_SIZES = {
    MsgType.HOLD: HOLD_PAYLOAD.size,
    MsgType.RELEASE: 0,
    MsgType.HEARTBEAT: HEARTBEAT_PAYLOAD.size,
    MsgType.TELEMETRY: TELEMETRY_PAYLOAD.size,
    MsgType.ACK: ACK_PAYLOAD.size,
    MsgType.NAK: NAK_PAYLOAD.size,
}
NO_SEQ = 0xFFFF


# ---------------------------------------------------------------- COBS
def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: output contains no 0x00."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


class CobsError(ValueError):
    pass


def cobs_decode(data: bytes) -> bytes:
    """Inverse of cobs_encode; raises CobsError on a malformed block."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError("zero byte inside a COBS frame")
        end = i + code
        if end > n:
            raise CobsError("COBS block runs past the frame end")
        block = data[i + 1 : end]
        if 0 in block:
            raise CobsError("zero byte inside a COBS frame")
        out += block
        i = end
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)


# ---------------------------------------------------------------- frames
@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int
    payload: bytes = b""
    epoch: int = NO_EPOCH
    version: int = PROTOCOL_VERSION


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_frame(frame: Frame) -> bytes:
    """Frame -> bytes on the wire, delimiters included."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    raw = HEADER.pack(frame.version, frame.type, frame.epoch, frame.seq & 0xFFFF, len(frame.payload)) + frame.payload
    raw += CRC.pack(crc32(raw))
    # leading delimiter: whatever garbage came before ends here, so this frame survives it
    return b"\x00" + cobs_encode(raw) + b"\x00"


@dataclass(frozen=True, slots=True)
class Reject:
    """A chunk between delimiters that is not a valid frame (never raised, counted)."""

    reason: NakReason
    detail: str
    seq: int = NO_SEQ  # from the header when the CRC matched, else unknown


def decode_frame(chunk: bytes) -> Frame | Reject:
    """One COBS chunk (delimiters stripped) -> Frame, or Reject with the reason. Never raises."""
    if len(chunk) > MAX_ENCODED:
        return Reject(NakReason.BAD_FRAMING, f"oversize chunk of {len(chunk)} bytes")
    try:
        raw = cobs_decode(chunk)
    except CobsError as err:
        return Reject(NakReason.BAD_FRAMING, str(err))
    if len(raw) < HEADER.size + CRC.size:
        return Reject(NakReason.BAD_FRAMING, f"short frame of {len(raw)} bytes")
    body, (crc,) = raw[: -CRC.size], CRC.unpack(raw[-CRC.size :])
    if crc32(body) != crc:
        return Reject(NakReason.BAD_CRC, "CRC mismatch")
    version, mtype, epoch, seq, length = HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        return Reject(NakReason.BAD_VERSION, f"protocol version {version}", seq)
    payload = body[HEADER.size :]
    if length != len(payload):
        return Reject(NakReason.BAD_FRAMING, f"length field {length} != {len(payload)}", seq)
    try:
        mtype_e = MsgType(mtype)
    except ValueError:
        return Reject(NakReason.UNKNOWN_TYPE, f"unknown message type 0x{mtype:02x}", seq)
    if PAYLOAD_SIZES[mtype_e] != length:
        return Reject(NakReason.BAD_PAYLOAD, f"{mtype_e.name} payload of {length} bytes", seq)
    return Frame(mtype_e, seq, payload, epoch, version)


class FrameParser:
    """Streaming parser: feed() any bytes, get back frames and rejects.

    Resynchronises on the next 0x00 after garbage; a run longer than MAX_ENCODED without
    a delimiter is discarded (and counted) instead of growing the buffer. Never raises.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False
        self.frames = 0
        self.rejects = 0

    def feed(self, data: bytes) -> list[Frame | Reject]:
        out: list[Frame | Reject] = []
        start = 0
        while True:
            idx = data.find(b"\x00", start)
            if idx < 0:
                self._append(data[start:])
                break
            self._append(data[start:idx])
            if self._overflow:
                out.append(Reject(NakReason.BAD_FRAMING, "no delimiter within max frame size"))
            elif self._buf:
                out.append(decode_frame(bytes(self._buf)))
            self._buf.clear()
            self._overflow = False
            start = idx + 1
        for item in out:
            if isinstance(item, Frame):
                self.frames += 1
            else:
                self.rejects += 1
        return out

    def _append(self, part: bytes) -> None:
        if self._overflow or not part:
            return
        if len(self._buf) + len(part) > MAX_ENCODED:
            self._buf.clear()
            self._overflow = True
        else:
            self._buf += part


# ---------------------------------------------------------------- payloads
@dataclass(frozen=True, slots=True)
class Telemetry:
    position_um: int
    volume_ul: int
    pressure_pa: int
    flow_ul_per_min: int
    state: InjectorState
    fault_code: int
    uptime_ms: int

    def pack(self) -> bytes:
        return TELEMETRY_PAYLOAD.pack(
            self.position_um,
            self.volume_ul,
            self.pressure_pa,
            self.flow_ul_per_min,
            int(self.state),
            self.fault_code,
            self.uptime_ms & 0xFFFFFFFF,
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Telemetry:
        """Raises ValueError on a wrong size or an unknown state byte."""
        try:
            pos, vol, pres, flow, state, fault, up = TELEMETRY_PAYLOAD.unpack(payload)
        except struct.error as err:
            raise ValueError(str(err)) from None
        return cls(pos, vol, pres, flow, InjectorState(state), fault, up)


def hold_frame(seq: int, reason: HoldReason, epoch: int = 1) -> Frame:
    return Frame(MsgType.HOLD, seq, HOLD_PAYLOAD.pack(int(reason)), epoch)


def release_frame(seq: int, epoch: int = 1) -> Frame:
    return Frame(MsgType.RELEASE, seq, b"", epoch)


def heartbeat_frame(seq: int, hold_latched: bool, epoch: int = 1) -> Frame:
    return Frame(MsgType.HEARTBEAT, seq, HEARTBEAT_PAYLOAD.pack(int(hold_latched)), epoch)


def ack_frame(seq: int, acked_seq: int, status: AckStatus) -> Frame:
    return Frame(MsgType.ACK, seq, ACK_PAYLOAD.pack(acked_seq, int(status)))


def nak_frame(seq: int, nak_seq: int, reason: NakReason) -> Frame:
    return Frame(MsgType.NAK, seq, NAK_PAYLOAD.pack(nak_seq, int(reason)))


def telemetry_frame(seq: int, telemetry: Telemetry) -> Frame:
    return Frame(MsgType.TELEMETRY, seq, telemetry.pack())


def seq_newer(a: int, b: int) -> bool:
    """RFC 1982 serial-number arithmetic on 16 bits: is a newer than b?"""
    diff = (a - b) & 0xFFFF
    return 0 < diff < 0x8000


class CommandGate:
    """The firmware's rules for admitting a command (docs/firmware-protocol.md), pure so the
    simulator runs them and the tests can fuzz them:

    - a new host epoch starts the bookkeeping afresh (reconnect, restarted bridge);
    - a seq seen recently is a DUPLICATE: ACKed again, not applied again;
    - a HOLD/RELEASE not newer than the last applied one is STALE: ACKed, not applied.

    `admit()` returns the status to ACK without applying, or None: apply it, then `done()`.
    """

    WINDOW = 64

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.recent: dict[int, AckStatus] = {}  # insertion-ordered: oldest first
        self.last_state_seq: int | None = None

    def reset(self) -> None:
        self.epoch = None
        self.recent.clear()
        self.last_state_seq = None

    def admit(self, frame: Frame) -> AckStatus | None:
        if frame.epoch != self.epoch:
            self.reset()
            self.epoch = frame.epoch
        if frame.seq in self.recent:
            return AckStatus.DUPLICATE
        if frame.type in (MsgType.HOLD, MsgType.RELEASE):
            if self.last_state_seq is not None and not seq_newer(frame.seq, self.last_state_seq):
                self.done(frame.seq, AckStatus.STALE)
                return AckStatus.STALE
            self.last_state_seq = frame.seq
        return None

    def done(self, seq: int, status: AckStatus) -> None:
        self.recent[seq] = status
        while len(self.recent) > self.WINDOW:
            del self.recent[next(iter(self.recent))]
