"""The hold latch: once held, held until a person acknowledges. Pure state, no I/O.

Reasons to hold are keyed by alert id (a guidance leak alert, or the bridge's own
`guidance_lost`). Nothing but `ack()` removes a reason: not an alert clear, not a reconnect,
not guidance coming back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AckResult:
    accepted: bool
    reason: str
    released: bool  # the last reason went: RELEASE may be sent now


@dataclass
class HoldLatch:
    reasons: dict[str, str] = field(default_factory=dict)  # alert_id -> kind
    acknowledged: set[str] = field(default_factory=set)

    @property
    def latched(self) -> bool:
        return bool(self.reasons)

    def latch(self, alert_id: str, kind: str) -> bool:
        """Add a reason; False if it was already latched or already acknowledged."""
        if alert_id in self.reasons or alert_id in self.acknowledged:
            return False
        self.reasons[alert_id] = kind
        return True

    def ack(self, alert_id: str) -> AckResult:
        if not self.reasons:
            return AckResult(False, "no hold is latched", False)
        if alert_id == "*":
            ids = list(self.reasons)
        elif alert_id in self.reasons:
            ids = [alert_id]
        else:
            latched = ", ".join(sorted(self.reasons))
            return AckResult(False, f"no latched hold has alert_id {alert_id!r} (latched: {latched})", False)
        for i in ids:
            del self.reasons[i]
            self.acknowledged.add(i)
        if self.reasons:
            return AckResult(
                True, f"acknowledged {', '.join(ids)}; still latched by {', '.join(sorted(self.reasons))}", False
            )
        return AckResult(True, f"acknowledged {', '.join(ids)}; hold released", True)
