"""Alerts: protocol messages (docs/protocol.md) over a ZeroMQ PUB socket. Knows nothing of
OpenCV or the model: it is handed numbers and evidence."""

from guidance.alerts.publisher import PRIORITIES, PROTOCOL, EventPublisher

__all__ = ["PRIORITIES", "PROTOCOL", "EventPublisher"]
