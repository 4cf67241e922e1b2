"""`guidance compare`: two evaluations of the same loops, paired per labelled event."""

from __future__ import annotations

import json

import pytest
from conftest import run_guidance

from guidance.errors import BadInputError
from guidance.evaluation.compare import binomial_two_sided_p, compare, load_summary


def _row(
    loop_id: str, events: list[tuple[str, int, bool]], fa: dict[str, int], minutes: float = 1.0, cement=None
) -> dict:
    return {
        "loop_id": loop_id,
        "dice": None if cement is None else {"vertebral_body": 0.95, "cement": cement, "needle": None},
        "score": {
            "minutes": minutes,
            "events": [{"kind": k, "onset_frame": f, "detected": d} for k, f, d in events],
            "per_kind": {k: {"false_alerts": fa.get(k, 0)} for k in ("posterior", "venous")},
            "false_alerts_total": sum(fa.values()),
        },
    }


def _summary(rows: list[dict]) -> dict:
    return {
        "schema": "cement-guidance-eval/1",
        "run": {},
        "dice": {"cement": 0.8},
        "latency_ms": {"p50": 10.0, "p99": 20.0},
        "loops": rows,
    }


A = _summary(
    [
        _row("l1", [("posterior", 40, True), ("venous", 60, False)], {"venous": 3}, cement=0.80),
        _row("l2", [("posterior", 10, False)], {}, cement=0.70),
        _row("l3", [("venous", 5, True)], {"posterior": 1}, cement=0.90),
        {"loop_id": "unlabelled", "score": None},
        _row("only_a", [("posterior", 1, True)], {}),
    ]
)
B = _summary(
    [
        _row("l1", [("posterior", 40, True), ("venous", 60, True)], {"venous": 1}, cement=0.85),
        _row("l2", [("posterior", 10, True)], {}, cement=0.75),
        _row("l3", [("venous", 5, False)], {}),  # no masks in B's run of this loop
        _row("only_b", [("venous", 1, True)], {}),
    ]
)


def test_exact_binomial_p_values():
    assert binomial_two_sided_p(0, 0) == 1.0
    assert binomial_two_sided_p(0, 5) == binomial_two_sided_p(5, 5) == pytest.approx(2 / 32)
    assert binomial_two_sided_p(1, 10) == pytest.approx(2 * 11 / 1024)
    assert binomial_two_sided_p(2, 4) == 1.0  # the middle: capped at 1


def test_events_are_paired_by_loop_kind_and_onset():
    c = compare(A, B)
    assert c["loops_compared"] == 3 and c["minutes_compared"] == 3.0
    assert c["only_in_a"] == ["only_a"] and c["only_in_b"] == ["only_b"]
    post, ven, overall = (c["detection"][k] for k in ("posterior", "venous", "overall"))
    assert (post["both"], post["a_only"], post["b_only"], post["neither"]) == (1, 0, 1, 0)
    assert (ven["both"], ven["a_only"], ven["b_only"], ven["neither"]) == (0, 1, 1, 0)
    assert overall["events"] == 4 and (overall["a_only"], overall["b_only"]) == (1, 2)
    assert overall["sensitivity_a"] == 0.5 and overall["sensitivity_b"] == 0.75
    assert overall["mcnemar_p"] == pytest.approx(binomial_two_sided_p(1, 3))
    fa = c["false_alerts"]
    assert (fa["venous"]["a"], fa["venous"]["b"], fa["posterior"]["a"], fa["overall"]["b"]) == (3, 1, 1, 1)
    assert fa["overall"]["a_per_min"] == pytest.approx(4 / 3)
    assert fa["overall"]["equal_rates_p"] == pytest.approx(binomial_two_sided_p(4, 5))
    # Dice per loop: only loops with masks in both runs, only classes present in both
    dice = c["dice"]["per_loop"]
    assert set(dice) == {"vertebral_body", "cement"}
    assert dice["cement"]["loops"] == 2 and (dice["cement"]["b_higher"], dice["cement"]["a_higher"]) == (2, 0)
    assert dice["cement"]["median_difference"] == pytest.approx(0.05)
    assert dice["cement"]["sign_test_p"] == pytest.approx(0.5)
    assert (dice["vertebral_body"]["b_higher"], dice["vertebral_body"]["a_higher"]) == (0, 0)
    assert dice["vertebral_body"]["sign_test_p"] == 1.0


def test_runs_on_different_labels_are_refused():
    relabelled = json.loads(json.dumps(B))
    relabelled["loops"][1]["score"]["events"][0]["onset_frame"] = 11
    with pytest.raises(BadInputError, match="l2"):
        compare(A, relabelled)
    extra_event = json.loads(json.dumps(B))  # B's labels hold a leak A's do not
    extra_event["loops"][2]["score"]["events"].append({"kind": "posterior", "onset_frame": 30, "detected": True})
    with pytest.raises(BadInputError, match="l3"):
        compare(A, extra_event)


def test_cli_prints_and_writes_the_comparison(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(A))
    (tmp_path / "b.json").write_text(json.dumps(B))
    out = tmp_path / "cmp.json"
    proc = run_guidance("compare", tmp_path / "a", tmp_path / "b.json", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "3 loops scored in both runs" in proc.stdout and "McNemar exact p" in proc.stdout
    assert json.loads(out.read_text())["detection"]["overall"]["b_only"] == 2
    bad = tmp_path / "not_a_summary.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    for path in (bad, tmp_path / "missing"):
        proc = run_guidance("compare", tmp_path / "a", path)
        assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(BadInputError, match="schema"):
        load_summary(bad)
