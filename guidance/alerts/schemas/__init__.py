"""JSON Schemas of the guidance wire protocol (`cement-guidance/1`), one file per message type."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent


def load_schema(message_type: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{message_type}.json").read_text())
