"""Loop results -> `summary.json`, and `--fail-under` thresholds -> exit code.

Schema: docs/evaluation.md and `schemas/summary.schema.json` (validated by the tests).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from importlib import resources

from guidance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInputError
from guidance.evaluation.labels import EVENT_KINDS
from guidance.evaluation.scoring import DICE_CLASSES, DiceCounter, aggregate_detection, percentile

SUMMARY_SCHEMA = "cement-guidance-eval/1"

# Fields that depend on the machine and the moment, not on the loops and the pipeline's
# decisions: left out when two runs (serial, processes, Dask) are compared for equality.
TIMING_LOOP_FIELDS = ("latency_ms", "wall_s", "cpu_s", "realtime_factor")
TIMING_TOP_FIELDS = ("run", "latency_ms")

# Row fields of a loop result that go into summary.json (the rest goes to loops/<slug>.json)
ROW_FIELDS = (
    "loop_id",
    "name",
    "source",
    "form",
    "labels",
    "status",
    "failure",
    "reason",
    "frames",
    "fps",
    "fps_source",
    "size",
    "missing_frames",
    "raises",
    "technical_alerts",
    "score",
    "dice",
    "latency_ms",
    "wall_s",
    "cpu_s",
    "realtime_factor",
    "artifacts",
)


def latency_stats(values: Sequence[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if len(values) else None,
    }


def build_summary(results: Sequence[dict], run_info: dict) -> dict:
    """Aggregate loop results (any order; rows are sorted by loop id)."""
    results = sorted(results, key=lambda r: r["loop_id"])
    scored = [r for r in results if r["status"] == "scored"]
    dice = DiceCounter()
    for r in scored:
        if r.get("dice_counts"):
            dice.add_counts(r["dice_counts"])
    latencies = [v for r in results for v in r.get("latencies_ms", [])]
    detection = aggregate_detection([r["score"] for r in scored])
    return {
        "schema": SUMMARY_SCHEMA,
        "run": run_info,
        "counts": {
            "loops": len(results),
            "scored": len(scored),
            "unscored": sum(r["status"] == "unscored" for r in results),
            "failed": sum(r["status"] == "failed" for r in results),
            "frames": sum(r.get("frames") or 0 for r in results),
        },
        "detection": detection,
        "dice": {**dice.dice(), "frames": dice.frames},
        "latency_ms": latency_stats(latencies),
        "fail_under": None,
        "exit_code": EXIT_OK,
        "loops": [{k: r.get(k) for k in ROW_FIELDS} for r in results],
    }


def without_timing(summary: dict) -> dict:
    """The summary minus machine- and moment-dependent fields (for equality checks)."""
    out = copy.deepcopy(summary)
    for key in TIMING_TOP_FIELDS:
        out.pop(key, None)
    for row in out.get("loops", []):
        for key in TIMING_LOOP_FIELDS:
            row.pop(key, None)
    if out.get("fail_under"):
        out["fail_under"]["results"] = [
            c for c in out["fail_under"]["results"] if not c["metric"].startswith("latency")
        ]
    return out


# ---- --fail-under ------------------------------------------------------------------------

# sensitivity* and dice* are lower bounds (value >= bound); every other metric (false alerts,
# delays, latency) is an upper bound (value <= bound)
LOWER_BOUND_PREFIXES = ("sensitivity", "dice")
# the pessimistic ends of the 95 % intervals: gate on what the archive shows for sure
INTERVAL_ENDS = {
    "sensitivity_lower95": ("sensitivity_ci95", 0),
    "false_alerts_per_min_upper95": ("false_alerts_per_min_ci95", 1),
}


def metric_names() -> list[str]:
    names = []
    for base in (
        "sensitivity",
        "sensitivity_lower95",
        "false_alerts_per_min",
        "false_alerts_per_min_upper95",
        "delay_ms_median",
        "delay_ms_p90",
        "delay_frames_median",
        "delay_frames_p90",
    ):
        names += [base] + [f"{base}_{kind}" for kind in EVENT_KINDS]
    names += ["dice"] + [f"dice_{name}" for name in DICE_CLASSES.values()]
    names += ["latency_ms_p50", "latency_ms_p99"]
    return names


def parse_fail_under(text: str | None) -> dict[str, float]:
    """'sensitivity=0.9,false_alerts_per_min=1.0' -> {metric: bound}."""
    if not text:
        return {}
    known = metric_names()
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise BadInputError(f"--fail-under: {part!r} is not METRIC=NUMBER with METRIC one of {', '.join(known)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise BadInputError(f"--fail-under: {key}: {value!r} is not a number") from None
    return out


def metric_value(summary: dict, metric: str) -> float | None:
    det = summary["detection"]
    if metric.startswith("dice"):
        if metric == "dice":
            values = [summary["dice"][n] for n in DICE_CLASSES.values()]
            return None if any(v is None for v in values) else min(values)
        return summary["dice"][metric.removeprefix("dice_")]
    if metric.startswith("latency_ms_"):
        return summary["latency_ms"][metric.removeprefix("latency_ms_")]
    for kind in EVENT_KINDS:
        if metric.endswith(f"_{kind}"):
            return _detection_metric(det["per_kind"][kind], metric.removesuffix(f"_{kind}"))
    return _detection_metric(det["overall"], metric)


def _detection_metric(row: dict, name: str) -> float | None:
    if name in INTERVAL_ENDS:
        field, end = INTERVAL_ENDS[name]
        interval = row[field]
        return None if interval is None else interval[end]
    return row[name]


def check_fail_under(summary: dict, thresholds: dict[str, float]) -> dict | None:
    """Each threshold met or not; a metric that was not measured (no events, no masks) is
    unmet: a gate that cannot be checked must not pass."""
    if not thresholds:
        return None
    results = []
    for metric, bound in thresholds.items():
        lower = metric.startswith(LOWER_BOUND_PREFIXES)
        value = metric_value(summary, metric)
        met = value is not None and (value >= bound if lower else value <= bound)
        results.append({"metric": metric, "op": ">=" if lower else "<=", "bound": bound, "value": value, "met": met})
    return {"results": results, "met": all(c["met"] for c in results)}


def exit_code(summary: dict) -> int:
    """2: a labels file broke the spec (found while running); 1: a loop failed or a threshold
    is unmet; 0: otherwise."""
    rows = summary["loops"]
    if any(r["status"] == "failed" and r.get("failure") == "labels" for r in rows):
        return EXIT_BAD_INPUT
    if any(r["status"] == "failed" for r in rows):
        return EXIT_FAILURE
    if summary.get("fail_under") and not summary["fail_under"]["met"]:
        return EXIT_FAILURE
    return EXIT_OK


def load_schema() -> dict:
    text = resources.files("guidance.evaluation").joinpath("schemas/summary.schema.json").read_text()
    return json.loads(text)
