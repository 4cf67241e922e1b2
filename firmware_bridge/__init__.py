"""firmware_bridge: guidance alerts -> injector firmware (HOLD), injector telemetry -> ZeroMQ.

Talks to guidance only through the wire protocol in docs/protocol.md; the serial protocol to
the firmware is in docs/firmware-protocol.md. Advisory software, not a certified medical device.
"""
