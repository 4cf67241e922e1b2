"""bench/latency.py still runs end to end (tiny loops, stand-in model): its report has every
number the README quotes. It measures nothing here: speed is the benchmark's job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_python

ROOT = Path(__file__).resolve().parent.parent


def run_latency_bench(tmp_path, stand_in, size: int, *extra: object):
    """bench/latency.py at 15 fps for 1 s in one round with the stand-in model -> (process, report)."""
    onnx_path, sums = stand_in
    out = tmp_path / "lat.json"
    proc = run_python(
        "bench/latency.py",
        *("--model", onnx_path, "--sha256sums", sums, "--size", size, "--seconds", 1, "--rates", 15),
        *("--rounds", 1, "--bare-runs", 5, "--json", out, *extra),
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_latency_benchmark_reports_every_number(tmp_path, stand_in):
    proc, report = run_latency_bench(tmp_path, stand_in, 128, "--control-seconds", 0.5)
    on, off = report["results"]  # the rate with the loop's keep-warm pass and without, side by side
    assert on["keep_warm"] and not off["keep_warm"] and off["rehearsals"] == 0
    assert 1 <= on["rehearsals"] <= on["frames_processed"]
    assert "keep-warm on (" in proc.stdout and "keep-warm off:" in proc.stdout
    for r in (on, off):
        assert r["frames_processed"] + r["dropped_frames"] == r["frames_in_loop"] == 15
        assert r["cpu_ms_per_frame"] > 0
        assert set(r["capture_to_publish_ms"]) == {"p50", "p99", "max"}
        assert r["bare_inference_ms"]["p50"] > 0 and r["overhead_ratio"] > 0
        # paired with frames only without keep-warm (it would take the pass's slot)
        assert r["paired_bare_inference_ms"]["samples"] == (0 if r["keep_warm"] else r["frames_processed"])
        assert {"capture", "calibrate", "segment", "track", "publish"} <= set(r["stage_median_ms"])
        control = r["host_control_ms"]
        # 0.5 s of a job started every 1/15 s: about 7 runs (fewer if the job overruns its period)
        assert 2 <= control["runs"] <= 8 and control["p50"] > 0 and control["job_ms"] > 0
        assert control["p99_over_p50"] == pytest.approx(control["p99"] / control["p50"], abs=0.02)
        slowest = r["slowest_frames_ms"]
        assert len(slowest) == 3 and {"capture", "segment", "track"} <= set(slowest[0])
        worst = [f["capture_to_publish"] for f in slowest]
        assert worst == sorted(worst, reverse=True) and worst[0] == r["capture_to_publish_ms"]["max"]
        # the same loop back to back (unpaced), every frame of each round, shared by both modes
        b2b = r["back_to_back"]
        assert b2b == on["back_to_back"] and b2b["frames"] == 15 and b2b["processing_p50_ms"] > 0
        assert b2b["overhead_ratio"] == pytest.approx(
            b2b["processing_p50_ms"] / r["bare_inference_ms"]["p50"], rel=0.02
        )
    assert report["rss_mb"]["peak"] > 0 and "CPU" in report["machine"]
    assert "overhead ratio" in proc.stdout and "host control" in proc.stdout and "back to back" in proc.stdout


def test_latency_benchmark_with_a_phantom_calibration(tmp_path, stand_in):
    """`--calibration phantom`: a bead phantom of the loop's size is calibrated first and every
    frame goes through the distortion correction (the run fails if the file cannot be trusted)."""
    proc, report = run_latency_bench(
        tmp_path, stand_in, 512, "--control-seconds", 0, "--calibration", "phantom", "--keep-warm", "on"
    )
    assert report["calibration"].endswith("calib.json") and "calibration:" in proc.stdout
    (r,) = report["results"]
    assert r["frames_processed"] + r["dropped_frames"] == r["frames_in_loop"] == 15
    assert not any(kind == "calibration_missing" for kind, _, _ in r["alerts"])


def test_inference_benchmark_compares_models_side_by_side(tmp_path, stand_in):
    onnx_path, _ = stand_in
    shipped = ROOT / "models" / "segmenter.onnx"
    proc = run_python("bench/inference.py", shipped, onnx_path, "--threads", 1, "--runs", 3)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "p50" in ln]
    assert len(lines) == 2 and str(shipped) in lines[0] and str(onnx_path) in lines[1]
    # each model's p50 as a ratio of the first's, as printed
    (p50_a, ratio_a), (p50_b, ratio_b) = [
        tuple(float(v) for v in re.search(r"p50 ([\d.]+) ms .* ratio ([\d.]+)$", ln).groups()) for ln in lines
    ]
    assert ratio_a == 1.0 and ratio_b == pytest.approx(p50_b / p50_a, abs=0.02)  # both printed rounded
    missing = run_python("bench/inference.py", tmp_path / "none.onnx", timeout=60)
    assert missing.returncode == 2 and "none.onnx" in missing.stderr


def test_frame_cost_benchmark_times_every_part_of_an_evaluated_frame():
    proc = run_python("bench/frame_cost.py", "--seconds", 0.5, "--size", 256, timeout=300)
    assert proc.returncode == 0, proc.stderr
    parts = [ln.split(" p50")[0].strip() for ln in proc.stdout.splitlines() if " p50 " in ln]
    assert parts == [
        "decode",
        "preprocess",
        "reference registration",
        "inference (1 thread)",
        "tracker",
        "mask read",
        "Dice",
        "overlay render",
        "overlay encode",
    ]
    assert "x real time at 15 fps" in proc.stdout


def test_idle_gap_benchmark_times_inference_after_each_kind_of_gap():
    proc = run_python("bench/idle_gap.py", "--runs", 3, "--gap-ms", 2, "--spinning", "--threads", 1, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 thread(s), spin-waiting on, gap 2 ms" in proc.stdout
    rows = {ln.split(" p50")[0].strip(): ln for ln in proc.stdout.splitlines() if " p50 " in ln}
    assert list(rows) == ["back to back", "after a sleep", "after busy work"]
    for line in rows.values():
        p50, p99 = float(line.split("p50")[1].split()[0]), float(line.split("p99")[1].split()[0])
        assert 0 < p50 <= p99
