"""`guidance compare A/summary.json B/summary.json`: two evaluations of the same loops, paired.

A site validating a new model, a new tracker setting or a new C-arm runs `guidance evaluate`
twice on one archive and asks whether B is better than A. Two rates side by side answer that
badly: the same leaks are in both runs, so what matters is the leaks one run caught and the
other missed. Paired per labelled event (matched by loop, kind and onset frame):

* detection: caught by both, by A only, by B only, by neither; exact McNemar test on the
  discordant events (two-sided binomial test of "A only" among A-only + B-only, p = 1/2);
* false alerts: per kind over the minutes both runs scored; exact conditional test of equal
  rates (A's count among both counts ~ Binomial(n, 1/2) when the minutes are the same);
* Dice per class: the pooled values side by side, and per loop with masks in both runs how
  many loops each run segments better (exact sign test) and the median per-loop difference;
* latency: side by side (machine-dependent: no test).

Only loops scored in both runs are compared; the rest are listed. Exit code 0, or 2 for a file
that is not an evaluation summary.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from guidance.errors import BadInputError

KINDS = ("posterior", "venous")


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n trials at p = 1/2 (doubled smaller tail, <= 1)."""
    if n == 0:
        return 1.0
    tail = min(k, n - k)
    p = sum(math.comb(n, i) for i in range(tail + 1)) / 2**n
    return min(1.0, 2 * p)


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable evaluation summary ({exc})") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("cement-guidance-eval/"):
        raise BadInputError(f"{path}: not a `guidance evaluate` summary.json (field 'schema')")
    return doc


def _scored(summary: dict) -> dict[str, dict]:
    return {row["loop_id"]: row for row in summary["loops"] if row.get("score")}


def _caught(row: dict) -> dict[tuple[str, int], bool]:
    """(kind, onset frame) of each labelled event of a scored loop -> detected or not."""
    return {(e["kind"], e["onset_frame"]): bool(e["detected"]) for e in row["score"]["events"]}


def _false_alerts(rows: dict[str, dict], loop_ids: list[str], kind: str) -> int:
    if kind == "overall":
        return sum(rows[k]["score"]["false_alerts_total"] for k in loop_ids)
    return sum(rows[k]["score"]["per_kind"][kind]["false_alerts"] for k in loop_ids)


def compare(a: dict, b: dict) -> dict:
    """The paired comparison of two summaries (B against A)."""
    rows_a, rows_b = _scored(a), _scored(b)
    common = sorted(rows_a.keys() & rows_b.keys())
    minutes = sum(rows_a[k]["score"]["minutes"] for k in common)
    # every labelled event once: (kind, caught by A, caught by B)
    paired: list[tuple[str, bool, bool]] = []
    for loop_id in common:
        caught_a, caught_b = _caught(rows_a[loop_id]), _caught(rows_b[loop_id])
        if caught_a.keys() != caught_b.keys():  # the same leaks in both, or nothing to pair
            raise BadInputError(f"loop {loop_id}: the two runs were scored on different labels")
        paired += [(kind, caught_a[kind, onset], caught_b[kind, onset]) for kind, onset in caught_a]
    detection: dict[str, dict] = {}
    false_alerts: dict[str, dict] = {}
    for kind in (*KINDS, "overall"):
        pairs = [(a_hit, b_hit) for k, a_hit, b_hit in paired if kind in (k, "overall")]
        both = sum(a_hit and b_hit for a_hit, b_hit in pairs)
        only_a = sum(a_hit and not b_hit for a_hit, b_hit in pairs)
        only_b = sum(b_hit and not a_hit for a_hit, b_hit in pairs)
        events = len(pairs)
        detection[kind] = {
            "events": events,
            "both": both,
            "a_only": only_a,
            "b_only": only_b,
            "neither": events - both - only_a - only_b,
            "sensitivity_a": (both + only_a) / events if events else None,
            "sensitivity_b": (both + only_b) / events if events else None,
            "mcnemar_p": binomial_two_sided_p(only_a, only_a + only_b),
        }
        fa_a, fa_b = _false_alerts(rows_a, common, kind), _false_alerts(rows_b, common, kind)
        false_alerts[kind] = {
            "a": fa_a,
            "b": fa_b,
            "a_per_min": fa_a / minutes if minutes else None,
            "b_per_min": fa_b / minutes if minutes else None,
            "equal_rates_p": binomial_two_sided_p(fa_a, fa_a + fa_b),
        }
    return {
        "a": {"run": a.get("run", {}), "loops_scored": len(rows_a)},
        "b": {"run": b.get("run", {}), "loops_scored": len(rows_b)},
        "loops_compared": len(common),
        "minutes_compared": minutes,
        "only_in_a": sorted(rows_a.keys() - rows_b.keys()),
        "only_in_b": sorted(rows_b.keys() - rows_a.keys()),
        "detection": detection,
        "false_alerts": false_alerts,
        "dice": {"a": a.get("dice"), "b": b.get("dice"), "per_loop": _paired_dice(rows_a, rows_b, common)},
        "latency_ms": {name: _latency(s) for name, s in (("a", a), ("b", b))},
    }


def _paired_dice(rows_a: dict[str, dict], rows_b: dict[str, dict], common: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for loop_id in common:
        da, db = rows_a[loop_id].get("dice") or {}, rows_b[loop_id].get("dice") or {}
        for name in da.keys() & db.keys():
            if da[name] is not None and db[name] is not None:
                out.setdefault(name, {"diffs": []})["diffs"].append(db[name] - da[name])
    for row in out.values():
        diffs = row.pop("diffs")
        higher_b, higher_a = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        row.update(
            loops=len(diffs),
            b_higher=higher_b,
            a_higher=higher_a,
            median_difference=statistics.median(diffs),
            sign_test_p=binomial_two_sided_p(higher_b, higher_b + higher_a),
        )
    return dict(sorted(out.items()))


def _latency(summary: dict) -> dict:
    lat = summary.get("latency_ms") or {}
    return {"p50": lat.get("p50"), "p99": lat.get("p99")}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def print_comparison(c: dict, out=sys.stdout) -> None:
    w = out.write
    w(f"{c['loops_compared']} loops scored in both runs ({c['minutes_compared']:.2f} min)")
    if c["only_in_a"] or c["only_in_b"]:
        w(f"; not compared: {len(c['only_in_a'])} only in A, {len(c['only_in_b'])} only in B")
    w("\n")
    for kind, d in c["detection"].items():
        w(
            f"  {kind:9s} events {d['events']}: both {d['both']}, A only {d['a_only']}, B only {d['b_only']}, "
            f"neither {d['neither']}; sensitivity A {_fmt(d['sensitivity_a'])} B {_fmt(d['sensitivity_b'])} "
            f"(McNemar exact p {d['mcnemar_p']:.3g})\n"
        )
    for kind, f in c["false_alerts"].items():
        w(
            f"  {kind:9s} false alerts A {f['a']} ({_fmt(f['a_per_min'], 2)}/min), B {f['b']} "
            f"({_fmt(f['b_per_min'], 2)}/min) (equal rates, exact p {f['equal_rates_p']:.3g})\n"
        )
    da, db = c["dice"]["a"] or {}, c["dice"]["b"] or {}
    names = [k for k in da if k != "frames"]
    if any(da.get(k) is not None or db.get(k) is not None for k in names):  # loops with masks
        w("  Dice A / B: " + ", ".join(f"{k} {_fmt(da.get(k))} / {_fmt(db.get(k))}" for k in names) + "\n")
    for name, d in c["dice"]["per_loop"].items():
        w(
            f"  {name} per loop ({d['loops']}): B higher in {d['b_higher']}, A in {d['a_higher']}, median "
            f"difference {d['median_difference']:+.4f} (sign test exact p {d['sign_test_p']:.3g})\n"
        )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="pair two `guidance evaluate` runs of the same loops (B against A)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="summary.json (or its folder) of the reference run")
    p.add_argument("b", metavar="B", help="summary.json (or its folder) of the run to compare")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    comparison = compare(load_summary(args.a), load_summary(args.b))
    print_comparison(comparison)
    if args.json:
        args.json.write_text(json.dumps(comparison, indent=2) + "\n")
    return 0
