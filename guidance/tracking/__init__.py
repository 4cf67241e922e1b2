"""Tracker: class map -> posterior/venous spread with temporal logic (pure)."""

from guidance.tracking.tracker import (
    TrackerConfig,
    TrackerState,
    TrackGeometry,
    TrackStatus,
    track,
)

__all__ = ["TrackGeometry", "TrackStatus", "TrackerConfig", "TrackerState", "track"]
