"""`guidance evaluate PATH... --out DIR`: score the service on recorded cine loops.

Exit codes: 0 all loops ran and every --fail-under threshold is met; 1 a loop failed (could
not be read or run) or a threshold is unmet; 2 bad input (arguments, no loops, a labels file
that breaks recorded-loops.md, model or settings), with one line naming what and why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from guidance import DISCLAIMER, __version__
from guidance.errors import BadInputError
from guidance.evaluation import settings as eval_settings

if TYPE_CHECKING:
    from guidance.evaluation.runner import LoopTask

# What evaluation needs (OpenCV, onnxruntime, the pipeline) is imported in run(), after the
# worker processes are started, and `guidance --help` (which builds every subcommand's
# parser) never pays for it.
METRICS_HELP = (
    "sensitivity, sensitivity_lower95 (its 95 % interval's low end), dice (lowest class), "
    "dice_vertebral_body|cement|needle (lower bounds); false_alerts_per_min, "
    "false_alerts_per_min_upper95 (its interval's high end), delay_ms_median, delay_ms_p90, "
    "delay_frames_median, delay_frames_p90, "
    "latency_ms_p50, latency_ms_p99 (upper bounds); the detection metrics also per kind with "
    "_posterior or _venous"
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score the service on recorded cine loops (summary.json, report.html, videos)",
        description=(
            "Run every recorded loop found under PATH through the live service's pipeline and "
            "score it against NAME.labels.json (recorded-loops.md). " + DISCLAIMER
        ),
        epilog=(
            "exit codes: 0 ok; 1 a loop failed or a --fail-under threshold is unmet; 2 bad "
            "input (arguments, no loops, a labels file that breaks the spec, model). "
            "--fail-under metrics: " + METRICS_HELP + "."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="loop files or folders of loops")
    p.add_argument("--out", required=True, metavar="DIR", help="results folder (created)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="local worker processes, one loop each at a time (default 1; auto: one per usable "
        "CPU, divided by --threads-per-worker)",
    )
    scale.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run loops on an existing dask.distributed scheduler (tcp://host:8786); "
        "paths and --out must be on a file system the workers see",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        metavar="T",
        help="inference and OpenCV threads per loop (default 1: scale by loops)",
    )
    p.add_argument(
        "--fail-under",
        metavar="METRIC=BOUND,...",
        help="e.g. sensitivity=0.9,false_alerts_per_min=1.0: exit code 1 when unmet",
    )
    p.add_argument("--no-video", action="store_true", help="skip the overlay videos")
    p.add_argument(
        "--overlay-size",
        type=int,
        default=512,
        metavar="PX",
        help="longest side of overlay videos and thumbnails' source (default 512)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary lines")
    eval_settings.add_arguments(p)
    p.set_defaults(func=run)


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of workers or 'auto'") from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as taskset or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    from guidance.evaluation.discovery import discover
    from guidance.evaluation.executors import WorkerPool

    t_start = time.perf_counter()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if args.workers == "auto":
        args.workers = max(1, usable_cpus() // max(1, args.threads_per_worker))
    if args.workers < 1:
        raise BadInputError(f"--workers must be >= 1, got {args.workers}")
    if args.threads_per_worker < 1:
        raise BadInputError(f"--threads-per-worker must be >= 1, got {args.threads_per_worker}")
    if args.overlay_size < 16:
        raise BadInputError(f"--overlay-size must be >= 16 px, got {args.overlay_size}")
    refs, orphans = discover(args.paths)
    if not refs and not orphans:
        raise BadInputError(
            f"no loops under {', '.join(args.paths)} (expected NAME.dcm, NAME.mp4/.avi/.mkv or NAME/000000.png ...)"
        )
    settings = eval_settings.build(args)
    # local workers start now, before this process imports the pipeline: they import it and
    # load the model while the labels and the model are checked here (WorkerPool)
    workers = min(args.workers, len(refs))
    pool = WorkerPool(workers, args.threads_per_worker, settings) if workers > 1 and not args.dask else None
    try:
        return _evaluate(args, refs, orphans, settings, pool, t_start, started)
    finally:
        if pool is not None:
            pool.shutdown()  # done already after the loops; here also when a check refused the run


def _evaluate(args, refs, orphans, settings, pool, t_start: float, started: str) -> int:
    from guidance.evaluation.discovery import estimate_frames
    from guidance.evaluation.executors import Progress, run_all
    from guidance.evaluation.labels import load_labels
    from guidance.evaluation.report import render_report
    from guidance.evaluation.runner import LoopTask, shared_model
    from guidance.evaluation.summary import build_summary, check_fail_under, exit_code, parse_fail_under
    from guidance.pipeline import load_model

    thresholds = parse_fail_under(args.fail_under)
    # every labels file is validated before any loop runs: a broken ground truth stops here
    labels = {r.loop_id: load_labels(r.labels) if r.labels else None for r in refs}
    # a missing, corrupt or unlisted model is refused here, naming the file, before any loop
    # runs; serial runs reuse this loaded, warmed model, workers load their own
    if args.workers > 1 or args.dask:
        load_model(settings)
    else:
        shared_model(settings)

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None

    slugs = _unique_slugs([r.slug for r in refs])
    tasks = [
        LoopTask(
            ref=r,
            labels=labels[r.loop_id],
            settings=settings,
            out_dir=str(out.resolve()),
            video=not args.no_video,
            overlay_max_side=args.overlay_size,
            slug=s,
        )
        for r, s in zip(refs, slugs, strict=True)
    ]
    progress = Progress(len(tasks), None, args.quiet)
    if progress.enabled:
        counts = [estimate_frames(r) for r in refs]
        progress.frames.total = None if None in counts else sum(counts)
        progress.frames.refresh()
    try:
        results = run_all(
            tasks,
            workers=args.workers,
            threads=args.threads_per_worker,
            dask_address=args.dask,
            progress=progress,
            pool=pool,
        )
    finally:
        progress.close()
    for path in orphans:
        r = base_result_for_orphan(path)
        results.append(r)

    details = {}
    for r in results:
        r.setdefault("slug", _slug_of(r, tasks))
        details[r["loop_id"]] = r
        r["artifacts"]["detail"] = _write_detail(r, out)
    run_info = {
        "tool": f"guidance evaluate {__version__}",
        "code_commit": _code_commit(),
        "started_utc": started,
        "executor": f"dask {args.dask}"
        if args.dask
        else f"processes x{args.workers}"
        if args.workers > 1
        else "serial",
        "threads_per_worker": args.threads_per_worker,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "wall_s": None,
        "settings": eval_settings.describe(settings),
    }
    summary = build_summary(results, run_info)
    summary["fail_under"] = check_fail_under(summary, thresholds)
    summary["exit_code"] = exit_code(summary)
    run_info["wall_s"] = round(time.perf_counter() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    latencies = [v for r in results for v in r.get("latencies_ms", [])]
    (out / "report.html").write_text(render_report(summary, details, latencies), encoding="utf-8")
    if not args.quiet:
        _print_summary(summary, out)
    return summary["exit_code"]


def _code_commit() -> str | None:
    """The git commit of the code under test (traceability), when run from a checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _unique_slugs(slugs: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in slugs:
        n = seen.get(s.lower(), 0)
        seen[s.lower()] = n + 1
        out.append(s if n == 0 else f"{s}-{n + 1}")
    return out


def _slug_of(result: dict, tasks: list[LoopTask]) -> str:
    for t in tasks:
        if t.ref.loop_id == result["loop_id"]:
            return t.slug
    return "orphan-" + Path(result["loop_id"]).name.replace(".labels.json", "")


def base_result_for_orphan(path: str) -> dict:
    from guidance.evaluation.discovery import LoopRef
    from guidance.evaluation.runner import base_result

    name = Path(path).name.removesuffix(".labels.json")
    r = base_result(LoopRef(loop_id=path, name=name, source=path, form="none", labels=path))
    r["failure"] = "no_loop"
    r["reason"] = "labels file without a loop beside it (no NAME.dcm, .mp4, .avi, .mkv or NAME/)"
    return r


def _write_detail(result: dict, out: Path) -> str:
    path = out / "loops" / f"{result['slug']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    detail = {k: v for k, v in result.items() if k not in ("thumbnails", "latencies_ms")}
    path.write_text(json.dumps(detail))
    return f"loops/{path.name}"


def _print_summary(summary: dict, out: Path) -> None:
    c = summary["counts"]
    det = summary["detection"]
    w = sys.stdout.write
    w(
        f"{c['loops']} loops: {c['scored']} scored, {c['unscored']} unscored, {c['failed']} failed; "
        f"{c['frames']} frames\n"
    )

    def interval(ci: list[float] | None) -> str:
        return f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else ""

    for kind, m in det["per_kind"].items():
        sens = "n/a" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
        fa = "n/a" if m["false_alerts_per_min"] is None else f"{m['false_alerts_per_min']:.2f}"
        delay = "n/a" if m["delay_ms_median"] is None else f"{m['delay_ms_median']:.0f} ms"
        w(
            f"  {kind:9s} sensitivity {sens}{interval(m['sensitivity_ci95'])} ({m['detected']}/{m['events']}), "
            f"median delay {delay}, false alerts/min {fa}{interval(m['false_alerts_per_min_ci95'])}\n"
        )
    dice = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in summary["dice"].items() if k != "frames")
    w(f"  Dice: {dice}\n")
    lat = summary["latency_ms"]
    if lat["n"]:
        w(f"  latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms\n")
    for r in summary["loops"]:
        if r["status"] == "failed":
            w(f"  FAILED {r['loop_id']}: {r['reason']}\n")
    if summary["fail_under"]:
        for ch in summary["fail_under"]["results"]:
            if not ch["met"]:
                w(f"  UNMET {ch['metric']} {ch['op']} {ch['bound']:g} (value {ch['value']})\n")
    w(f"results in {out}/ (summary.json, report.html); exit code {summary['exit_code']}\n")
