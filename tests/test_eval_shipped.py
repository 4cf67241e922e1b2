"""`guidance evaluate` with the shipped model (no --model) on the bundled demo loops: the
same run a site does first. Checks the wiring end to end, and that --fail-under gates on
Dice floors set well below what the shipped model scores (its quality numbers themselves are
in models/CARD.md and in the README's evaluation table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from guidance.evaluation.summary import load_schema

ROOT = Path(__file__).resolve().parents[1]
# The shipped segmenter.onnx scored Dice 0.974 (vertebral body), 0.880 (cement) and 0.910
# (needle) on these three demo loops (`guidance evaluate models/demo --no-video`, 0.4.2
# model; 0.4.1: 0.974 / 0.874 / 0.909). The floors sit clearly below that (room for onnxruntime/OpenCV versions) and far
# above what a broken model, wrong labels or a mis-wired pipeline would score.
FLOORS = "dice_vertebral_body=0.9,dice_cement=0.75,dice_needle=0.8"


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
            FLOORS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
    assert [c["metric"] for c in summary["fail_under"]["results"]] == [
        "dice_vertebral_body",
        "dice_cement",
        "dice_needle",
    ]
    # the run paired with itself (`guidance compare`): every event agrees, no difference
    paired = compare_runs(out, out / "summary.json", tmp_path / "cmp.json")
    assert paired["loops_compared"] == 3 and paired["detection"]["overall"]["events"] == 2
    assert paired["detection"]["overall"]["a_only"] == paired["detection"]["overall"]["b_only"] == 0
    assert paired["detection"]["overall"]["mcnemar_p"] == 1.0
    cement = paired["dice"]["per_loop"]["cement"]
    assert cement["loops"] == 3 and cement["b_higher"] == cement["a_higher"] == 0 and cement["sign_test_p"] == 1.0
    # against a run that missed one of those leaks: the pairing finds it, on A's side
    missed = json.loads((out / "summary.json").read_text())
    caught = [e for row in missed["loops"] for e in (row["score"] or {}).get("events", []) if e["detected"]]
    caught[0]["detected"] = False
    (tmp_path / "missed.json").write_text(json.dumps(missed))
    overall = compare_runs(out, tmp_path / "missed.json", tmp_path / "cmp2.json")["detection"]["overall"]
    assert (overall["both"], overall["a_only"], overall["b_only"]) == (len(caught) - 1, 1, 0)


def compare_runs(a: Path, b: Path, json_out: Path) -> dict:
    """`guidance compare A B --json OUT` as a user runs it -> the paired comparison."""
    proc = subprocess.run(
        [sys.executable, "-m", "guidance", "compare", str(a), str(b), "--json", str(json_out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(json_out.read_text())
