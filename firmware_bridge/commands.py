"""Reliable commands to the firmware: sequence numbers, ACK/NAK, retransmission, bounded retries.

Pure: the caller passes `now_ns` and writes the returned bytes. Several commands may be in
flight at once (a HOLD never waits behind a HEARTBEAT); the firmware (wire.CommandGate) applies
HOLD/RELEASE in sequence order within an epoch and ACKs a late duplicate without applying it
twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from firmware_bridge import wire
from firmware_bridge.wire import AckStatus, Frame, MsgType


@dataclass
class Pending:
    frame: Frame
    first_sent_ns: int
    last_sent_ns: int
    attempts: int = 1


@dataclass(frozen=True)
class Outcome:
    """A command finished: ACKed (status set) or failed after its retries (status None)."""

    frame: Frame
    status: AckStatus | None
    attempts: int
    elapsed_ns: int
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None


class CommandChannel:
    def __init__(self, ack_timeout_ns: int = 40_000_000, max_attempts: int = 5, seq_start: int | None = None) -> None:
        self.ack_timeout_ns = ack_timeout_ns
        self.max_attempts = max_attempts
        # random starts: a restarted bridge is unlikely to reuse the firmware's last epoch; if
        # it does, the firmware calls our newest command STALE and the bridge re-syncs
        self._seq = random.randrange(0x10000) if seq_start is None else seq_start & 0xFFFF
        self.epoch = random.randrange(1, 256)
        self.pending: dict[int, Pending] = {}
        self.sent = self.acked = self.retransmits = self.failed = self.stray_acks = 0
        self.last_state_seq: int | None = None  # our newest HOLD/RELEASE

    def resync(self) -> None:
        """A new epoch (after a (re)connect, a firmware restart, a STALE newest command): the
        firmware starts its bookkeeping afresh. Commands still in flight move to the new epoch
        so a late copy from the old one cannot reset it again."""
        self.epoch = self.epoch % 255 + 1
        for p in self.pending.values():
            p.frame = replace(p.frame, epoch=self.epoch)

    def command(self, mtype: MsgType, now_ns: int, **kw: object) -> bytes:
        """Build, register and encode a new command; returns the bytes to write."""
        self._seq = (self._seq + 1) & 0xFFFF
        if mtype is MsgType.HOLD:
            frame = wire.hold_frame(self._seq, kw["reason"], self.epoch)  # type: ignore[arg-type]
        elif mtype is MsgType.RELEASE:
            frame = wire.release_frame(self._seq, self.epoch)
        elif mtype is MsgType.HEARTBEAT:
            frame = wire.heartbeat_frame(self._seq, bool(kw["hold_latched"]), self.epoch)
        else:
            raise ValueError(f"{mtype!r} is not a command")
        self.pending[frame.seq] = Pending(frame, now_ns, now_ns)
        self.sent += 1
        if mtype is not MsgType.HEARTBEAT:
            self.last_state_seq = frame.seq
        return wire.encode_frame(frame)

    def has_pending(self, mtype: MsgType) -> bool:
        return any(p.frame.type == mtype for p in self.pending.values())

    def on_ack(self, payload: bytes, now_ns: int) -> Outcome | None:
        acked_seq, status = wire.ACK_PAYLOAD.unpack(payload)
        pending = self.pending.pop(acked_seq, None)
        if pending is None:
            self.stray_acks += 1  # duplicated or late ACK of a finished command
            return None
        try:
            status_e = AckStatus(status)
        except ValueError:
            status_e = AckStatus.REFUSED
        self.acked += 1
        return Outcome(pending.frame, status_e, pending.attempts, now_ns - pending.first_sent_ns)

    def on_nak(self, payload: bytes, now_ns: int) -> tuple[list[bytes], list[Outcome]]:
        """The firmware could not read a frame: resend the one named, or all if unknown."""
        nak_seq, _reason = wire.NAK_PAYLOAD.unpack(payload)
        seqs = [nak_seq] if nak_seq in self.pending else list(self.pending)
        return self._resend(seqs, now_ns)

    def poll(self, now_ns: int) -> tuple[list[bytes], list[Outcome]]:
        """Retransmit what timed out; fail what ran out of attempts."""
        due = [s for s, p in self.pending.items() if now_ns - p.last_sent_ns >= self.ack_timeout_ns]
        return self._resend(due, now_ns)

    def next_deadline_ns(self) -> int | None:
        if not self.pending:
            return None
        return min(p.last_sent_ns for p in self.pending.values()) + self.ack_timeout_ns

    def abandon(self, now_ns: int, why: str) -> list[Outcome]:
        """Link gone: everything in flight failed."""
        out = [Outcome(p.frame, None, p.attempts, now_ns - p.first_sent_ns, why) for p in self.pending.values()]
        self.failed += len(out)
        self.pending.clear()
        return out

    def _resend(self, seqs: list[int], now_ns: int) -> tuple[list[bytes], list[Outcome]]:
        data: list[bytes] = []
        failed: list[Outcome] = []
        for seq in seqs:
            p = self.pending[seq]
            if p.attempts >= self.max_attempts:
                del self.pending[seq]
                self.failed += 1
                failed.append(
                    Outcome(p.frame, None, p.attempts, now_ns - p.first_sent_ns, f"no ACK after {p.attempts} attempts")
                )
                continue
            p.attempts += 1
            p.last_sent_ns = now_ns
            self.retransmits += 1
            data.append(wire.encode_frame(p.frame))
        return data, failed
