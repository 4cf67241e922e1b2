"""`guidance evaluate` with the shipped model (no --model) on the bundled demo loops: the
same run a site does first. Checks the wiring end to end, not the model's quality numbers
(those are in models/CARD.md and in the README's evaluation table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from guidance.evaluation.summary import load_schema

ROOT = Path(__file__).resolve().parents[1]


def test_demo_loops_with_the_shipped_model(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidance",
            "evaluate",
            str(ROOT / "models" / "demo"),
            "--out",
            str(out),
            "--no-video",
            "--fail-under",
            "dice_vertebral_body=0.0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, load_schema())
    assert summary["run"]["settings"]["model"].endswith("segmenter.onnx")
    assert summary["run"]["settings"]["model_sha256"]
    rows = {r["name"]: r for r in summary["loops"]}
    assert set(rows) == {"clean", "posterior_leak", "venous_leak"}
    assert all(r["status"] == "scored" and r["frames"] == 90 for r in rows.values())
    assert summary["detection"]["per_kind"]["posterior"]["events"] == 1
    assert summary["detection"]["per_kind"]["venous"]["events"] == 1
    assert summary["dice"]["frames"] == 270
    assert summary["fail_under"]["met"] is True
