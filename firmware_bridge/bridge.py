"""The bridge: guidance alerts (ZeroMQ SUB) -> HOLD on the injector link; telemetry -> PUB.

One thread, one poll loop over the guidance SUB, the ack REP and the serial fd, with every
timer (watchdogs, retransmission, heartbeats, reconnect) folded into the poll deadline: no
locks, no sleeps, and a HOLD goes out in the same loop turn the alert arrives in.

Safety rules (docs/firmware-protocol.md):
- a high-priority posterior/venous leak alert, or guidance silent > 1 s, latches a HOLD;
- only an accepted operator ack on the REP socket unlatches; only then RELEASE is sent;
- a latched hold is re-asserted after reconnect and whenever the firmware reports otherwise;
- every command ends ACKed or as a `command_failed` alert.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from firmware_bridge import messages, wire
from firmware_bridge.commands import CommandChannel, Outcome
from firmware_bridge.latch import HoldLatch
from firmware_bridge.link import InjectorLink, LinkError
from firmware_bridge.messages import GuidanceAlert, GuidanceHeartbeat, Rejected
from firmware_bridge.wire import AckStatus, HoldReason, InjectorState, MsgType

log = logging.getLogger("firmware_bridge")
MS = 1_000_000


@dataclass
class BridgeConfig:
    guidance_endpoint: str = "tcp://127.0.0.1:5556"  # connect (SUB)
    ack_endpoint: str = "tcp://127.0.0.1:5557"  # bind (REP)
    pub_endpoint: str = "tcp://127.0.0.1:5558"  # bind (PUB)
    guidance_timeout_s: float = 1.0
    # before the first guidance heartbeat ever: how long guidance may take to come up (boot,
    # model load) before the bridge holds. None: the same as guidance_timeout_s (fail-safe)
    guidance_startup_s: float | None = None
    injector_timeout_s: float = 0.5
    heartbeat_period_s: float = 0.5  # bridge heartbeat on the PUB
    link_heartbeat_period_s: float = 0.2  # HEARTBEAT command to the firmware
    ack_timeout_s: float = 0.04
    max_attempts: int = 5
    reconnect_period_s: float = 0.1
    reassert_period_s: float = 0.25
    sndhwm: int = 1000
    rcvhwm: int = 1000
    linger_ms: int = 500

    def validate(self) -> None:
        for name in (
            "guidance_timeout_s",
            "injector_timeout_s",
            "heartbeat_period_s",
            "link_heartbeat_period_s",
            "ack_timeout_s",
            "reconnect_period_s",
            "reassert_period_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.guidance_startup_s is not None and not self.guidance_startup_s > 0:
            raise ValueError(f"guidance_startup_s must be > 0, got {self.guidance_startup_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass
class _Active:
    alert_id: str
    kind: str
    priority: str
    raised_seq: int
    message: str


@dataclass
class Counters:
    guidance_accepted: int = 0
    guidance_rejected: int = 0
    guidance_lost_messages: int = 0
    dropped_messages: int = 0
    telemetry_duplicates: int = 0
    acks_accepted: int = 0
    acks_refused: int = 0
    link_losses: int = 0
    holds_sent: int = 0
    releases_sent: int = 0
    firmware_restarts: int = 0
    loop_turns: int = 0  # poll wake-ups: a busy loop shows here
    last_reject: str = ""


class Bridge:
    def __init__(self, config: BridgeConfig, link: InjectorLink, context: zmq.Context | None = None) -> None:
        config.validate()
        self.config = config
        self.link = link
        self.ctx = context or zmq.Context.instance()
        self.session = secrets.token_hex(6)
        self.envelope = messages.Envelope(self.session)
        # ack replies go out on the REP, not the PUB: their own counter, so a PUB subscriber
        # never sees a seq gap for a message it could not have received
        self.reply_envelope = messages.Envelope(self.session)
        self.latch = HoldLatch()
        self.channel = CommandChannel(int(config.ack_timeout_s * 1e9), config.max_attempts)
        self.parser = wire.FrameParser()
        self._frames_before = self._rejects_before = 0
        self.counters = Counters()
        self.active: dict[str, _Active] = {}  # kind -> raised alert
        self.state = "starting"
        self.telemetry: wire.Telemetry | None = None
        self._telemetry_seq: int | None = None
        self._release_fw_seq: int | None = None  # firmware seq of the ACK of our last RELEASE
        self.hold_confirmed = False  # the firmware ACKed the latest HOLD and no RELEASE since
        self.stop_event = threading.Event()
        # guidance session tracking
        self.g_session: str | None = None
        self.g_seq: int | None = None
        self.g_retired: set[str] = set()
        self.g_last_frame: int | None = None
        self.g_state: str | None = None  # state in guidance's last heartbeat
        self._sockets_open = False
        self._connect_error = ""  # why the last connect attempt failed ("" when connected)
        self.pub_address = self.ack_address = ""

    # ------------------------------------------------------------ sockets
    def open(self) -> Bridge:
        c = self.config
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, c.rcvhwm)
        # guidance (re)starting: be connected within 20 ms of its bind (default 100 ms)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 20)
        # status too, though only its seq and frame are used: the publisher's seq counts every
        # type, so a SUB that filtered status out could not tell loss from filtering
        for topic in messages.GUIDANCE_TOPICS:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, c.linger_ms)
        self.pub.setsockopt(zmq.SNDHWM, c.sndhwm)
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, c.linger_ms)
        self.rep.setsockopt(zmq.SNDHWM, c.sndhwm)
        self.rep.setsockopt(zmq.RCVHWM, c.rcvhwm)
        try:
            self.pub.bind(c.pub_endpoint)
            self.rep.bind(c.ack_endpoint)
            self.sub.connect(c.guidance_endpoint)
        except zmq.ZMQError as err:
            self.close()
            raise OSError(f"cannot set up ZeroMQ sockets: {err}") from None
        self.pub_address = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.ack_address = self.rep.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.poller.register(self.rep, zmq.POLLIN)
        self._link_fd: int | None = None
        self._sockets_open = True
        return self

    def close(self) -> None:
        for name in ("sub", "pub", "rep"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close()
        self.link.stop()
        self._sockets_open = False

    # ------------------------------------------------------------ main loop
    def run(self) -> None:
        """Serve until stop_event is set. Never raises on bad input or link faults."""
        if not self._sockets_open:
            self.open()
        now = time.monotonic_ns()
        self._started_ns = now
        self._last_g_heartbeat_ns = now  # guidance gets its timeout to show up, then: HOLD
        self._last_rx_ns = now
        self._next_pub_heartbeat_ns = now
        self._next_link_heartbeat_ns = now
        self._next_reconnect_ns = now
        self._last_hold_sent_ns = 0
        self._try_connect(now)
        self.state = "running"
        while not self.stop_event.is_set():
            now = time.monotonic_ns()
            timeout_ms = max(0, min(self._next_deadline_ns(now) - now, 100 * MS)) / MS
            self.counters.loop_turns += 1
            try:
                events = dict(self.poller.poll(timeout_ms))
            except zmq.ZMQError as err:  # EINTR on a signal: go round, stop_event decides
                log.debug("poll interrupted: %s", err)
                continue
            # guidance first: it is the latency-critical path
            if self.sub in events:
                self._drain_guidance()
            if self._link_fd is not None and self._link_fd in events:
                self._read_link(time.monotonic_ns())
            if self.rep in events:
                self._serve_ack()
            self._timers(time.monotonic_ns())
        self.state = "stopping"
        self._publish_heartbeat(time.monotonic_ns())

    def _guidance_timeout_ns(self) -> int:
        """The startup grace until guidance's first heartbeat saying anything but `starting`,
        then the heartbeat watchdog proper."""
        c = self.config
        if self.g_state in (None, "starting") and c.guidance_startup_s is not None:
            return int(c.guidance_startup_s * 1e9)
        return int(c.guidance_timeout_s * 1e9)

    def _next_deadline_ns(self, now: int) -> int:
        c = self.config
        # only timers that can still fire: a deadline in the past would make poll() spin
        deadlines = [self._next_pub_heartbeat_ns]
        if "guidance_lost" not in self.active:
            deadlines.append(self._last_g_heartbeat_ns + self._guidance_timeout_ns() + 1)
        if "injector_silent" not in self.active:
            deadlines.append(self._last_rx_ns + int(c.injector_timeout_s * 1e9) + 1)
        if self.link.connected:
            deadlines.append(self._next_link_heartbeat_ns)
            if self.latch.latched and not self.hold_confirmed and not self.channel.has_pending(MsgType.HOLD):
                deadlines.append(self._last_hold_sent_ns + int(c.reassert_period_s * 1e9))
        else:
            deadlines.append(self._next_reconnect_ns)
        pending = self.channel.next_deadline_ns()
        if pending is not None:
            deadlines.append(pending)
        return min(deadlines)

    def _timers(self, now: int) -> None:
        c = self.config
        # guidance watchdog
        limit_ns = self._guidance_timeout_ns()
        if now - self._last_g_heartbeat_ns > limit_ns and "guidance_lost" not in self.active:
            silent_ms = (now - self._last_g_heartbeat_ns) / MS
            never = " since the bridge started" if self.g_state is None else ""
            self._guidance_lost(
                f"No guidance heartbeat for {silent_ms:.0f} ms{never} (limit {limit_ns / MS:.0f} ms): injector held.",
                now,
            )
        # firmware watchdog
        if now - self._last_rx_ns > c.injector_timeout_s * 1e9 and "injector_silent" not in self.active:
            why = f" ({self._connect_error})" if self._connect_error else ""
            self._raise(
                "injector_silent",
                f"Injector firmware silent for {(now - self._last_rx_ns) / MS:.0f} ms on {self.link.name}{why}.",
            )
        # command retransmission / failure
        resend, failed = self.channel.poll(now)
        for data in resend:
            self._write(data, now)
        for outcome in failed:
            self._command_failed(outcome)
        if self.link.connected:
            if now >= self._next_link_heartbeat_ns:
                self._next_link_heartbeat_ns = now + int(c.link_heartbeat_period_s * 1e9)
                if not self.channel.has_pending(MsgType.HEARTBEAT):
                    self._write(self.channel.command(MsgType.HEARTBEAT, now, hold_latched=self.latch.latched), now)
            # a latched hold the firmware has not confirmed: keep asserting it
            if (
                self.latch.latched
                and not self.hold_confirmed
                and not self.channel.has_pending(MsgType.HOLD)
                and now - self._last_hold_sent_ns >= c.reassert_period_s * 1e9
            ):
                self._send_hold(HoldReason.REASSERT, now)
        elif now >= self._next_reconnect_ns:
            self._try_connect(now)
        if now >= self._next_pub_heartbeat_ns:
            self._publish_heartbeat(now)
            self._next_pub_heartbeat_ns = now + int(c.heartbeat_period_s * 1e9)

    # ------------------------------------------------------------ guidance
    def _drain_guidance(self) -> None:
        for _ in range(100):  # bounded: the serial side must not starve
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_guidance(frames, time.monotonic_ns())

    def _reject_guidance(self, why: str) -> None:
        self.counters.guidance_rejected += 1
        self.counters.last_reject = why
        log.warning("guidance message rejected: %s", why)

    def _on_guidance(self, frames: list[bytes], now: int) -> None:
        msg = messages.parse_guidance(frames)
        if isinstance(msg, Rejected):
            self._reject_guidance(msg.reason)
            return
        if msg.session in self.g_retired:
            self._reject_guidance(f"message from retired guidance session {msg.session}")
            return
        if msg.session != self.g_session:
            if self.g_session is not None:
                log.warning("guidance session changed %s -> %s (guidance restarted)", self.g_session, msg.session)
                self.g_retired.add(self.g_session)
            else:
                log.info("guidance session %s", msg.session)
            self.g_session, self.g_seq = msg.session, None
        if self.g_seq is not None:
            if msg.seq <= self.g_seq:
                self._reject_guidance(f"seq {msg.seq} not after {self.g_seq} (duplicate or reordered)")
                return
            if msg.seq > self.g_seq + 1:
                self.counters.guidance_lost_messages += msg.seq - self.g_seq - 1
                log.warning("guidance seq gap: %d message(s) lost", msg.seq - self.g_seq - 1)
        self.g_seq = msg.seq
        self.counters.guidance_accepted += 1
        if isinstance(msg, GuidanceAlert):
            self._on_alert(msg, now)
        elif isinstance(msg, GuidanceHeartbeat):
            self._on_heartbeat(msg, now)
        elif msg.frame is not None:
            self.g_last_frame = msg.frame

    def _on_alert(self, alert: GuidanceAlert, now: int) -> None:
        if alert.frame is not None:
            self.g_last_frame = alert.frame
        if alert.requests_hold:
            newly = self.latch.latch(alert.alert_id, alert.kind)
            if alert.alert_id in self.latch.acknowledged:
                log.info("alert %s already acknowledged; no new hold", alert.alert_id)
                return
            # every new leak raise goes to the wire, even when a hold is already latched
            self._send_hold(HoldReason.CLINICAL_ALERT, now)
            lat_ms = (now - alert.publish_mono_ns) / MS
            log.warning(
                "HOLD: %s %s (%s) frame %s; alert->hold %.1f ms",
                alert.kind,
                alert.state,
                alert.alert_id,
                alert.frame,
                lat_ms,
            )
            if newly:
                self._on_latched(alert.alert_id, alert.kind)
        elif alert.kind in messages.CLINICAL_HOLD_KINDS and alert.state == "cleared":
            if alert.alert_id in self.latch.reasons:
                log.warning("alert %s cleared by guidance; hold stays latched until an operator ack", alert.alert_id)
        else:
            log.info("alert %s %s (%s): no hold", alert.kind, alert.state, alert.priority)

    def _guidance_lost(self, message: str, now: int) -> None:
        alert_id = self._raise("guidance_lost", message)
        self._send_hold(HoldReason.GUIDANCE_LOST, now)
        if self.latch.latch(alert_id, "guidance_lost"):
            self._on_latched(alert_id, "guidance_lost")

    def _on_heartbeat(self, hb: GuidanceHeartbeat, now: int) -> None:
        if hb.state == "stopping":  # guidance is going away: no need to wait for the silence
            if "guidance_lost" not in self.active:
                self._guidance_lost("Guidance is stopping: injector held.", now)
            return
        self._last_g_heartbeat_ns = now
        self.g_state = hb.state
        if "guidance_lost" in self.active:
            # the alert clears; the hold it latched stays until acknowledged
            self._clear("guidance_lost", "Guidance heartbeat back; hold stays latched until an operator ack.")
        # a leak raise we missed (joined late, message lost) is still in the active list
        for active in hb.active_alerts:
            if active.requests_hold and self.latch.latch(active.alert_id, active.kind):
                log.warning("HOLD: %s %s learned from guidance heartbeat", active.kind, active.alert_id)
                self._send_hold(HoldReason.CLINICAL_ALERT, now)
                self._on_latched(active.alert_id, active.kind)

    def _on_latched(self, alert_id: str, kind: str) -> None:
        self._clear("hold_latched", "superseded")
        self._raise(
            "hold_latched",
            f"Injector hold latched by {kind} ({alert_id}); operator acknowledgment required to release.",
        )

    # ------------------------------------------------------------ operator ack
    def _serve_ack(self) -> None:
        try:
            payload = self.rep.recv(zmq.NOBLOCK)
            while self.rep.getsockopt(zmq.RCVMORE):  # extra frames: ignore, still reply once
                self.rep.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        now = time.monotonic_ns()
        req = messages.parse_ack(payload)
        operator = alert_id = None
        if isinstance(req, Rejected):
            accepted, reason = False, f"malformed ack: {req.reason}"
        else:
            operator, alert_id = req.operator, req.alert_id
            if "guidance_lost" in self.active:
                accepted, reason = (
                    False,
                    ("guidance is not heard: the hold cannot be released while the injector is unguarded"),
                )
            elif not self.link.connected:
                accepted, reason = False, "injector link is down: RELEASE cannot be delivered"
            else:
                result = self.latch.ack(alert_id)
                accepted, reason = result.accepted, result.reason
                if result.released:
                    self._write(self.channel.command(MsgType.RELEASE, now), now)
                    self.counters.releases_sent += 1
                    self.hold_confirmed = False
                    self._clear("hold_latched", f"Released after acknowledgment by {operator}.")
                    log.warning("RELEASE sent after ack by %s (%s)", operator, alert_id)
        if accepted:
            self.counters.acks_accepted += 1
            log.warning("ack accepted from %s for %s: %s", operator, alert_id, reason)
        else:
            self.counters.acks_refused += 1
            log.warning("ack refused (operator %s, alert %s): %s", operator, alert_id, reason)
        reply = self.reply_envelope.make(
            "ack_reply",
            {
                "accepted": accepted,
                "reason": reason,
                "hold_latched": self.latch.latched,
                "latched_alerts": sorted(self.latch.reasons),
                "operator": operator,
                "alert_id": alert_id,
            },
            now,
            time.time_ns(),
        )
        self.rep.send(messages.dumps(reply))  # REP: a reply is always owed and never blocks

    # ------------------------------------------------------------ the link
    def _try_connect(self, now: int) -> None:
        self._next_reconnect_ns = now + int(self.config.reconnect_period_s * 1e9)
        try:
            self.link.connect()
            self.link.start()
        except LinkError as err:
            if str(err) != self._connect_error:  # say it once per distinct reason, not 10/s
                log.warning(
                    "injector link not up: %s (retrying every %.0f ms)", err, self.config.reconnect_period_s * 1000
                )
                self._connect_error = str(err)
            return
        self._connect_error = ""
        fd = self.link.fileno()
        self._link_fd = fd
        self.poller.register(fd, zmq.POLLIN)
        self._frames_before += self.parser.frames  # heartbeat counters stay cumulative
        self._rejects_before += self.parser.rejects
        self.parser = wire.FrameParser()
        self.channel.resync()
        self._telemetry_seq = None
        self._release_fw_seq = None
        log.warning("injector link up on %s", self.link.name)
        if self.latch.latched:  # the latched hold outlives the cable
            self._send_hold(HoldReason.REASSERT, now)
        else:
            self._write(self.channel.command(MsgType.HEARTBEAT, now, hold_latched=False), now)
        self._next_link_heartbeat_ns = now + int(self.config.link_heartbeat_period_s * 1e9)

    def _link_down(self, why: str, now: int) -> None:
        if self._link_fd is not None:
            self.poller.unregister(self._link_fd)
            self._link_fd = None
        self.link.stop()
        self.hold_confirmed = False
        self.counters.link_losses += 1
        log.error("injector link lost: %s", why)
        for outcome in self.channel.abandon(now, f"link lost ({why})"):
            self._command_failed(outcome)
        self._clear("injector_silent", "superseded by link loss")
        self._raise("injector_silent", f"Injector link lost: {why}; reconnecting.")
        self._next_reconnect_ns = now + int(self.config.reconnect_period_s * 1e9)

    def _write(self, data: bytes, now: int) -> None:
        if not self.link.connected:
            return  # the channel times the command out and reports it
        try:
            self.link.write(data)
        except LinkError as err:
            self._link_down(str(err), now)

    def _send_hold(self, reason: HoldReason, now: int) -> None:
        self.hold_confirmed = False
        self._last_hold_sent_ns = now
        if not self.link.connected:
            log.error("HOLD wanted (%s) but the injector link is down; re-asserted on reconnect", reason.name)
            return
        self._write(self.channel.command(MsgType.HOLD, now, reason=reason), now)
        self.counters.holds_sent += 1

    def _read_link(self, now: int) -> None:
        try:
            data = self.link.read()
        except LinkError as err:
            self._link_down(str(err), now)
            return
        for item in self.parser.feed(data):
            if isinstance(item, wire.Reject):
                log.debug("serial frame rejected: %s", item.detail)
                continue
            self._last_rx_ns = now
            if "injector_silent" in self.active:
                self._clear("injector_silent", f"Injector firmware heard again on {self.link.name}.")
            if item.type is MsgType.TELEMETRY:
                self._on_telemetry(item, now)
            elif item.type is MsgType.ACK:
                outcome = self.channel.on_ack(item.payload, now)
                if outcome is not None:
                    self._on_outcome(outcome, item.seq)
            elif item.type is MsgType.NAK:
                resend, failed = self.channel.on_nak(item.payload, now)
                for out in resend:
                    self._write(out, now)
                for outcome in failed:
                    self._command_failed(outcome)
            else:  # a command type coming from the firmware makes no sense: note it
                log.warning("unexpected %s frame from the firmware", item.type)

    def _on_outcome(self, outcome: Outcome, ack_fw_seq: int) -> None:
        ftype = outcome.frame.type
        if outcome.status is AckStatus.REFUSED:
            self._command_failed(outcome)
            return
        if (
            outcome.status is AckStatus.STALE
            and ftype is not MsgType.HEARTBEAT
            and outcome.frame.seq == self.channel.last_state_seq
        ):
            # our newest HOLD/RELEASE cannot be older than anything we sent: the firmware's
            # baseline is from another host session in the same epoch. New epoch, send again.
            log.warning(
                "firmware called our newest %s (seq %d) stale: re-syncing and sending it again",
                ftype.name,
                outcome.frame.seq,
            )
            self.channel.resync()
            if ftype is MsgType.HOLD and self.latch.latched:
                self._send_hold(HoldReason.REASSERT, time.monotonic_ns())
            elif ftype is MsgType.RELEASE and not self.latch.latched:
                self._write(self.channel.command(MsgType.RELEASE, time.monotonic_ns()), time.monotonic_ns())
            return
        if ftype is MsgType.RELEASE:
            self._release_fw_seq = ack_fw_seq
        if "command_failed" in self.active:
            self._clear(
                "command_failed", f"{ftype.name} seq {outcome.frame.seq} acknowledged; commands get through again."
            )
        if ftype is MsgType.HOLD and self.latch.latched and not self.channel.has_pending(MsgType.HOLD):
            self.hold_confirmed = True
        log.debug(
            "%s seq %d ACKed (%s) after %d attempt(s), %.1f ms",
            ftype.name,
            outcome.frame.seq,
            outcome.status.name if outcome.status is not None else "-",
            outcome.attempts,
            outcome.elapsed_ns / MS,
        )

    def _command_failed(self, outcome: Outcome) -> None:
        ftype = outcome.frame.type
        why = outcome.why or (
            f"refused by firmware ({outcome.status.name})" if outcome.status is not None else "failed"
        )
        msg = (
            f"Injector command {ftype.name} seq {outcome.frame.seq} failed: {why} "
            f"({outcome.attempts} attempt(s), {outcome.elapsed_ns / MS:.0f} ms)."
        )
        log.error(msg)
        if ftype is MsgType.HOLD:
            self.hold_confirmed = False  # the reassert timer keeps trying
        if ftype is MsgType.HEARTBEAT and "command_failed" in self.active:
            return  # one alert per episode for heartbeats; HOLD/RELEASE always raise anew
        self._clear("command_failed", "superseded")
        self._raise("command_failed", msg)

    def _on_telemetry(self, frame: wire.Frame, now: int) -> None:
        try:
            t = wire.Telemetry.unpack(frame.payload)
        except ValueError as err:
            log.warning("bad telemetry payload: %s", err)
            return
        last = self.telemetry
        if (
            last is not None and t.uptime_ms + 1000 < last.uptime_ms and last.uptime_ms < 0xFFFFFFFF - 60_000
        ):  # not the 49-day wrap
            # the firmware restarted on a link that stayed up (UART): its seqs and its
            # duplicate window start over, so ours must too
            log.warning("injector firmware restarted (uptime %d ms -> %d ms)", last.uptime_ms, t.uptime_ms)
            self.counters.firmware_restarts += 1
            self._telemetry_seq = self._release_fw_seq = None
            self.channel.resync()
            self.hold_confirmed = False  # a latched hold is re-asserted
        if self._telemetry_seq is not None and not wire.seq_newer(frame.seq, self._telemetry_seq):
            self.counters.telemetry_duplicates += 1  # duplicated or reordered: stale, dropped
            return
        self._telemetry_seq = frame.seq
        self.telemetry = t
        if t.state is InjectorState.FAULT and "injector_fault" not in self.active:
            self._raise("injector_fault", f"Injector reports fault code {t.fault_code}.")
        elif t.state is not InjectorState.FAULT and "injector_fault" in self.active:
            self._clear("injector_fault", "Injector fault cleared.")
        if (
            t.state is InjectorState.HELD
            and not self.latch.latched
            and not self.channel.has_pending(MsgType.RELEASE)
            and (self._release_fw_seq is None or wire.seq_newer(frame.seq, self._release_fw_seq))
        ):
            # held, but not by a latch of ours: the bridge restarted, or the firmware held
            # itself (host watchdog, cleared fault). Adopt it so an operator ack can release.
            alert_id = self._raise(
                "hold_latched",
                "Injector reports held without a hold "
                "latched by the bridge (bridge restart, firmware watchdog "
                "or cleared fault): operator acknowledgment required to "
                "release.",
            )
            self.latch.latch(alert_id, "injector_held")
            log.warning("injector held by itself: adopted as latched hold %s", alert_id)
        if self.latch.latched and self.hold_confirmed and t.state not in (InjectorState.HELD, InjectorState.FAULT):
            log.warning("firmware reports %s while a hold is latched: re-asserting HOLD", t.state.name)
            self.hold_confirmed = False
        self._publish(
            "telemetry",
            {
                "plunger_position_mm": t.position_um / 1000.0,
                "delivered_volume_ml": t.volume_ul / 1000.0,
                "pressure_kpa": t.pressure_pa / 1000.0,
                "flow_ml_per_min": t.flow_ul_per_min / 1000.0,
                "injector_state": t.state.name.lower(),
                "fault_code": t.fault_code,
                "hold_latched": self.latch.latched,
                "firmware_seq": frame.seq,
                "firmware_uptime_ms": t.uptime_ms,
                "received_mono_ns": now,
            },
            now,
        )

    # ------------------------------------------------------------ publishing
    def _publish(self, topic: str, body: dict[str, Any], now: int, frame: int | None = None) -> dict[str, Any]:
        doc = self.envelope.make(topic, body, now, time.time_ns(), frame)
        try:
            self.pub.send_multipart([topic.encode(), messages.dumps(doc)], zmq.NOBLOCK)
        except zmq.Again:
            self.counters.dropped_messages += 1
        return doc

    def _raise(self, kind: str, message: str) -> str:
        now = time.monotonic_ns()
        seq = self.envelope.seq + 1
        alert_id = f"{self.session}:{seq}"
        priority = messages.BRIDGE_ALERT_PRIORITY[kind]
        self.active[kind] = _Active(alert_id, kind, priority, seq, message)
        log.warning("alert raised: %s (%s): %s", kind, priority, message)
        self._publish("alert", self._alert_body(alert_id, kind, "raised", priority, message), now, self.g_last_frame)
        return alert_id

    def _clear(self, kind: str, message: str) -> None:
        active = self.active.pop(kind, None)
        if active is None:
            return
        log.info("alert cleared: %s: %s", kind, message)
        self._publish(
            "alert",
            self._alert_body(active.alert_id, kind, "cleared", active.priority, message),
            time.monotonic_ns(),
            self.g_last_frame,
        )

    @staticmethod
    def _alert_body(alert_id: str, kind: str, state: str, priority: str, message: str) -> dict[str, Any]:
        return {
            "alert_id": alert_id,
            "kind": kind,
            "state": state,
            "priority": priority,
            "category": "technical",
            "evidence": None,
            "message": message,
        }

    def _publish_heartbeat(self, now: int) -> None:
        t = self.telemetry
        self._publish(
            "heartbeat",
            {
                "period_ms": int(self.config.heartbeat_period_s * 1000),
                "state": self.state,
                "active_alerts": [
                    {
                        "alert_id": a.alert_id,
                        "kind": a.kind,
                        "priority": a.priority,
                        "frame": None,
                        "raised_seq": a.raised_seq,
                    }
                    for a in self.active.values()
                ],
                "frames_processed": self._frames_before + self.parser.frames,
                "dropped_frames": self._rejects_before + self.parser.rejects,
                "dropped_messages": self.counters.dropped_messages,
                "last_frame": None,
                "hold_latched": self.latch.latched,
                "latched_alerts": sorted(self.latch.reasons),
                "hold_confirmed": self.hold_confirmed,
                "link": "connected" if self.link.connected else "disconnected",
                "port": self.link.name,
                "injector_state": t.state.name.lower() if t else None,
                "guidance": {
                    "session": self.g_session,
                    "last_seq": self.g_seq,
                    "accepted": self.counters.guidance_accepted,
                    "rejected": self.counters.guidance_rejected,
                    "lost": self.counters.guidance_lost_messages,
                },
                "commands": {
                    "sent": self.channel.sent,
                    "acked": self.channel.acked,
                    "retransmits": self.channel.retransmits,
                    "failed": self.channel.failed,
                    "in_flight": len(self.channel.pending),
                },
            },
            now,
        )
