"""Offline evaluation on recorded cine loops (issue 4).

Loops found under the given paths (see /work/shared/spec/recorded-loops.md) run through the
same pipeline code as the live service (`guidance.pipeline.run_replay`), and are scored by
the spec: detection and delay per labelled event, false alerts per minute, Dice per class,
per-frame latency. Results: `summary.json`, `report.html`, an overlay video per loop.

Module map (one job each):
- `discovery`: which loops live under a path, and their labels file.
- `labels`: load and validate `cine-labels/1` labels and their masks.
- `scoring`: pure scoring functions (no I/O, no clocks).
- `runner`: runs one loop through the live pipeline and collects what scoring needs.
- `executors`: serial, local processes, Dask: the same `evaluate_loop` everywhere.
- `summary`: aggregate loop results into `summary.json`; `--fail-under` thresholds.
- `report`, `overlay`: the HTML report and the overlay videos.
"""
