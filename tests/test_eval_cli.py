"""`guidance evaluate` end to end: loops written by the simulator (and by hand), run through
the real pipeline (guidance.pipeline.run_replay, onnxruntime with a stand-in ONNX graph),
summary validated against its JSON Schema, report, videos, exit codes, executors."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from conftest import build_stand_in, run_guidance, write_sums

from guidance.evaluation.labels import load_labels
from guidance.evaluation.scoring import raises_from_messages, score_loop
from guidance.evaluation.settings import for_evaluation
from guidance.evaluation.summary import load_schema, without_timing
from guidance.pipeline import run_replay
from guidance.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_guidance("evaluate", *args, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    path = build_stand_in(d / "segmenter.onnx", 64)
    write_sums(path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Simulated loops in three forms (PNG folder, AVI, DICOM), with labels and masks; one
    loop without labels; one file that is not a video."""
    root = tmp_path_factory.mktemp("archive")
    for fmt, seed in (("png", 3), ("avi", 4), ("dcm", 5)):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "models.sim",
                str(root / "sim"),
                "--count",
                "1",
                "--seed",
                str(seed),
                "--size",
                "96",
                "--seconds",
                "2",
                "--fps",
                "15",
                "--format",
                fmt,
                "--leaks",
                "both",
                "--prefix",
                fmt,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
    # a loop without labels: the AVI's frames again, under another name
    shutil.copy(next((root / "sim").glob("avi_*.avi")), root / "sim" / "unlabelled.avi")
    (root / "broken").mkdir()
    (root / "broken" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    return root


def read_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, load_schema())
    return summary


def test_end_to_end_archive(archive, model, tmp_path):
    out = tmp_path / "out"
    proc = evaluate(archive, "--out", out, "--model", model)
    # the corrupt file fails, the others complete: exit 1, no traceback
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    s = read_summary(out)
    rows = {r["loop_id"]: r for r in s["loops"]}
    assert set(rows) == {
        "broken/corrupt.mp4",
        "sim/avi_4_0000.avi",
        "sim/dcm_5_0000.dcm",
        "sim/png_3_0000",
        "sim/unlabelled.avi",
    }
    assert rows["broken/corrupt.mp4"]["status"] == "failed"
    assert "corrupt.mp4" in rows["broken/corrupt.mp4"]["reason"]
    assert rows["broken/corrupt.mp4"]["failure"] == "unreadable"
    assert rows["sim/unlabelled.avi"]["status"] == "unscored"
    assert rows["sim/unlabelled.avi"]["frames"] == 30 and rows["sim/unlabelled.avi"]["score"] is None
    assert s["counts"] == {"loops": 5, "scored": 3, "unscored": 1, "failed": 1, "frames": 120}
    assert s["exit_code"] == 1
    for name in ("sim/avi_4_0000.avi", "sim/dcm_5_0000.dcm", "sim/png_3_0000"):
        row = rows[name]
        assert row["status"] == "scored" and row["frames"] == 30 and row["fps"] == 15.0
        assert row["size"] == [96, 96]
        assert set(row["dice"]) == {"vertebral_body", "cement", "needle"}
        assert len(row["score"]["events"]) == 2  # --leaks both
        # overlay video: every frame, readable
        video = out / row["artifacts"]["video"]
        cap = cv2.VideoCapture(str(video))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30
        ok, frame = cap.read()
        cap.release()
        assert ok and frame.shape[2] == 3
        detail = json.loads((out / row["artifacts"]["detail"]).read_text())
        assert detail["series"]["frame"] == list(range(30))
    assert s["dice"]["frames"] == 90
    # no timing-driven alert in an evaluation: results must not depend on the machine's load
    assert not [a for r in s["loops"] for a in r["technical_alerts"] if a["kind"] == "latency_overrun"]
    assert s["run"]["settings"]["latency_budget_ms"] == 0.0
    assert s["latency_ms"]["n"] == 120
    assert s["detection"]["overall"]["events"] == 6
    # report: parses, one timeline per loop that ran, the failed loop listed
    page = (out / "report.html").read_text()
    tags = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    P().feed(page)
    assert sum(1 for t, a in tags if t == "svg" and a.get("class") == "timeline") == 4
    assert not [t for t, _ in tags if t in ("script", "link")]
    assert "corrupt.mp4" in page
    assert ("table", {"id": "failed"}) in tags
    # progress bars stay silent when stderr is not a TTY
    assert "frames" not in proc.stderr and "loops" not in proc.stderr
    assert "failed" in proc.stdout and "exit code 1" in proc.stdout


def test_scores_are_the_pipeline_alerts_scored_by_the_spec(archive, model, tmp_path):
    """The summary reports exactly the raises the live pipeline publishes for the loop."""
    loop = next((archive / "sim").glob("png_*"))
    labels = load_labels(loop.parent / f"{loop.name}.labels.json")
    settings = for_evaluation(load_settings(overrides={"segmentation": {"model": str(model)}}))
    messages: list[dict] = []
    run = run_replay(str(loop), settings, on_result=lambda fr: messages.extend(fr.messages))
    expected = score_loop(labels.events, raises_from_messages(messages), 15.0, run.frames_read)
    out = tmp_path / "out"
    proc = evaluate(loop, "--out", out, "--model", model, "--no-video", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --quiet
    [row] = read_summary(out)["loops"]
    assert row["score"] == json.loads(json.dumps(expected))
    assert row["raises"] == [{"kind": r.kind, "frame": r.frame} for r in raises_from_messages(messages)]
    assert "video" not in row["artifacts"]


def test_executors_give_identical_summaries(archive, model, tmp_path):
    from distributed import LocalCluster

    sim = archive / "sim"
    serial = tmp_path / "serial"
    procs = tmp_path / "procs"
    dask_out = tmp_path / "dask"
    assert evaluate(sim, "--out", serial, "--model", model, "--no-video").returncode == 0
    assert evaluate(sim, "--out", procs, "--model", model, "--no-video", "--workers", "2").returncode == 0
    # in-process workers, reachable over TCP loopback from the CLI's process
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_port=0,
    ) as cluster:
        proc = evaluate(sim, "--out", dask_out, "--model", model, "--no-video", "--dask", cluster.scheduler_address)
    assert proc.returncode == 0, proc.stderr
    a, b, c = (read_summary(p) for p in (serial, procs, dask_out))
    assert a["run"]["executor"] == "serial"
    assert b["run"]["executor"] == "processes x2"
    assert c["run"]["executor"].startswith("dask ")
    assert without_timing(a) == without_timing(b) == without_timing(c)
    assert a["counts"]["scored"] == 3 and a["loops"][0]["latency_ms"]["n"] == 30


def test_fail_under_sets_the_exit_code(archive, model, tmp_path):
    loop = next((archive / "sim").glob("dcm_*.dcm"))
    first = evaluate(loop, "--out", tmp_path / "a", "--model", model, "--no-video", "-q")
    assert first.returncode == 0
    s = read_summary(tmp_path / "a")
    fa = s["detection"]["overall"]["false_alerts_per_min"]
    dice = s["dice"]["vertebral_body"]
    met = f"false_alerts_per_min={fa},dice_vertebral_body={dice}"
    proc = evaluate(loop, "--out", tmp_path / "b", "--model", model, "--no-video", "-q", "--fail-under", met)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(tmp_path / "b")["fail_under"]["met"] is True
    unmet = f"false_alerts_per_min={fa - 0.5},dice_vertebral_body={dice + 0.01}"
    proc = evaluate(loop, "--out", tmp_path / "c", "--model", model, "--no-video", "--fail-under", unmet)
    assert proc.returncode == 1
    s = read_summary(tmp_path / "c")
    assert [c["met"] for c in s["fail_under"]["results"]] == [False, False]
    assert "UNMET false_alerts_per_min" in proc.stdout


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0]


def test_bad_labels_stop_before_anything_runs(archive, model, tmp_path):
    loops = tmp_path / "loops"
    shutil.copytree(archive / "sim", loops)
    labels = next(loops.glob("avi_*.labels.json"))
    doc = json.loads(labels.read_text())
    doc["events"][0]["onset_frame"] = "12"
    labels.write_text(json.dumps(doc))
    out = tmp_path / "out"
    proc = evaluate(loops, "--out", out, "--model", model)
    _one_line_error(proc, str(labels), "events[0].onset_frame")
    assert not (out / "summary.json").exists()


def test_labels_that_disagree_with_the_video_fail_that_loop_with_exit_2(archive, model, tmp_path):
    loops = tmp_path / "loops"
    shutil.copytree(archive / "sim", loops)
    masks = next(loops.glob("png_*.masks.npz"))
    np.savez_compressed(masks, labels=np.zeros((29, 96, 96), np.uint8))  # one frame short
    proc = evaluate(loops, "--out", tmp_path / "out", "--model", model, "--no-video", "-q")
    assert proc.returncode == 2
    rows = {r["name"]: r for r in read_summary(tmp_path / "out")["loops"]}
    bad = rows[masks.name.removesuffix(".masks.npz")]
    assert bad["status"] == "failed" and bad["failure"] == "labels"
    assert "'masks'" in bad["reason"] and "29 frames" in bad["reason"]
    assert sum(r["status"] == "scored" for r in rows.values()) == 2  # the others completed


def test_bad_arguments_and_missing_inputs(archive, model, tmp_path, capsys, monkeypatch):
    """In-process through guidance.cli.main (the subprocess path is covered above)."""
    from guidance import cli
    from guidance.evaluation import executors

    def main_error(*args: str) -> str:
        code = cli.main(["evaluate", *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        return err

    assert "no such file" in main_error(tmp_path / "nope", "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "no loops" in main_error(tmp_path / "empty", "--out", tmp_path / "o")
    err = main_error(archive / "sim", "--out", tmp_path / "o", "--fail-under", "recall=0.9")
    assert "--fail-under" in err and "recall=0.9" in err
    assert "--workers" in main_error(archive / "sim", "--out", tmp_path / "o", "--workers", "0")
    monkeypatch.setattr(executors, "DASK_CONNECT_TIMEOUT_S", 1.0)
    err = main_error(archive / "sim", "--out", tmp_path / "o", "--model", model, "--dask", "tcp://127.0.0.1:9")
    assert "--dask tcp://127.0.0.1:9" in err
    assert "none.onnx" in main_error(archive / "sim", "--out", tmp_path / "o", "--model", tmp_path / "none.onnx")
    # with local workers, started before the model is checked: refused all the same, and the
    # workers are gone when it returns
    none = tmp_path / "none.onnx"
    assert "none.onnx" in main_error(archive / "sim", "--out", tmp_path / "o", "--model", none, "--workers", "2")
    assert multiprocessing.active_children() == []


def test_workers_auto_is_one_per_usable_cpu(archive, model, tmp_path):
    """--workers auto: the CPUs the process may use (its affinity, as taskset sets it) over
    --threads-per-worker; `--workers x` is refused by argparse."""
    cpus = sorted(os.sched_getaffinity(0))
    cases = [(cpus[:1], 1, "serial"), (cpus[:2], 2, "serial")]
    if len(cpus) >= 2:
        cases.append((cpus[:2], 1, "processes x2"))
    for allowed, threads, executor in cases:
        out = tmp_path / f"out{len(allowed)}{threads}"
        proc = subprocess.run(
            [sys.executable, "-m", "guidance", "evaluate", archive / "sim", "--out", out, "--model", model]
            + ["--no-video", "-q", "--workers", "auto", "--threads-per-worker", str(threads)],
            cwd=ROOT,
            preexec_fn=lambda allowed=allowed: os.sched_setaffinity(0, allowed),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert read_summary(out)["run"]["executor"] == executor, (allowed, threads)
    bad = evaluate(archive / "sim", "--out", tmp_path / "bad", "--workers", "x")
    assert bad.returncode == 2 and "'x': expected a number of workers or 'auto'" in bad.stderr


def loaded_models() -> int:
    """In a worker: how many models it holds loaded."""
    from guidance.evaluation import runner

    return len(runner._MODELS)


def test_a_worker_pool_starts_its_workers_at_once_and_loads_the_model_before_any_loop(model):
    from guidance.evaluation.executors import WorkerPool

    settings = for_evaluation(load_settings(overrides={"segmentation": {"model": str(model)}}))
    pool = WorkerPool(2, 1, settings)
    try:
        assert len(multiprocessing.active_children()) >= 2  # both spawned, no loop submitted
        assert pool.submit(loaded_models).result(timeout=120) == 1
    finally:
        pool.shutdown()
    assert multiprocessing.active_children() == []


def test_the_command_line_imports_only_the_part_it_runs():
    """`guidance evaluate` builds its own parser only: the service's module (OpenCV, the
    pipeline) is not imported before the evaluation starts its workers."""
    from guidance.cli import requested_command

    assert requested_command(["evaluate", "x", "--out", "o"]) == "evaluate"
    assert requested_command(["-v", "evaluate", "-h"]) == "evaluate"
    assert requested_command(["-h", "evaluate"]) is None and requested_command([]) is None
    assert requested_command(["nope", "evaluate"]) is None  # argparse names the bad one
    code = (
        "import sys; from guidance import cli; cli.build_parser('evaluate'); "
        "print(sorted({'guidance.app', 'cv2', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_orphan_labels_are_a_failed_row(archive, model, tmp_path):
    loops = tmp_path / "loops"
    loops.mkdir()
    loop = next((archive / "sim").glob("dcm_*.dcm"))
    for f in loop.parent.glob(loop.stem + ".*"):  # the loop, its labels and masks
        shutil.copy(f, loops)
    (loops / "lost.labels.json").write_text(json.dumps({"schema": "cine-labels/1", "view": "lateral", "events": []}))
    proc = evaluate(loops, "--out", tmp_path / "out", "--model", model, "--no-video", "-q")
    assert proc.returncode == 1
    rows = read_summary(tmp_path / "out")["loops"]
    lost = [r for r in rows if r["status"] == "failed"]
    assert len(lost) == 1 and "without a loop" in lost[0]["reason"]
    assert lost[0]["failure"] == "no_loop"


class Bomb:
    """Settings that kill the worker process that unpickles them (a stand-in for a loop that
    crashes its worker: segfault, out of memory)."""

    def __init__(self) -> None:
        self.parent = __import__("os").getpid()

    def __setstate__(self, state: dict) -> None:
        import os

        if os.getpid() != state["parent"]:
            os._exit(3)
        self.__dict__.update(state)


@pytest.mark.parametrize("early", [False, True], ids=["own-pool", "early-pool"])
def test_a_worker_that_dies_fails_only_its_loop(archive, model, early):
    """Also when the first batch runs on a pool started before the loops were known (as
    `guidance evaluate` does): the crash breaks it, the others are retried in fresh ones."""
    from guidance.evaluation.discovery import discover
    from guidance.evaluation.executors import Progress, WorkerPool, run_processes
    from guidance.evaluation.runner import LoopTask

    refs, _ = discover([archive / "sim"])
    settings = for_evaluation(load_settings(overrides={"segmentation": {"model": str(model)}}))
    good = [r for r in refs if r.labels][:2]
    tasks = [
        LoopTask(ref=r, labels=load_labels(r.labels), settings=settings, out_dir="/nowhere", video=False) for r in good
    ]
    tasks.insert(1, LoopTask(ref=refs[-1], labels=None, settings=Bomb(), out_dir="/nowhere", video=False, slug="bomb"))
    pool = WorkerPool(2, 1, settings) if early else None
    results = list(run_processes(tasks, workers=2, threads=1, progress=Progress(3, None, True), pool=pool))
    assert multiprocessing.active_children() == []  # every pool shut down, the early one too
    by_id = {r["loop_id"]: r for r in results}
    assert len(results) == 3
    assert by_id[refs[-1].loop_id]["status"] == "failed"
    assert by_id[refs[-1].loop_id]["failure"] == "worker"
    assert all(by_id[r.loop_id]["status"] == "scored" for r in good)


def test_a_corrupt_frame_is_skipped_reported_and_scored_as_background(archive, model, tmp_path):
    loops = tmp_path / "loops"
    src = next((archive / "sim").glob("png_*.labels.json"))
    name = src.name.removesuffix(".labels.json")
    shutil.copytree(archive / "sim" / name, loops / name)
    for suffix in (".labels.json", ".masks.npz"):
        shutil.copy(archive / "sim" / f"{name}{suffix}", loops)
    (loops / name / "000005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    proc = evaluate(loops, "--out", out, "--model", model, "-q")
    assert proc.returncode == 0, proc.stderr
    [row] = read_summary(out)["loops"]
    assert row["status"] == "scored" and row["frames"] == 30 and row["missing_frames"] == 1
    assert {"kind": "frame_error", "state": "raised", "frame": 5} in row["technical_alerts"]
    assert row["latency_ms"]["n"] == 29
    detail = json.loads((out / row["artifacts"]["detail"]).read_text())
    assert 5 not in detail["series"]["frame"] and len(detail["series"]["frame"]) == 29
    assert json.loads(json.dumps(detail["dice_counts"]))["frames"] == 30  # skipped = background
    cap = cv2.VideoCapture(str(out / row["artifacts"]["video"]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30  # a placeholder keeps it in step
    cap.release()


def test_progress_bars_on_a_terminal(archive, model, tmp_path):
    """On a TTY (a pseudo-terminal here) the loops and frames bars are drawn on stderr."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full pty buffer would block the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and drained
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "guidance",
                "evaluate",
                str(archive / "sim"),
                "--out",
                str(tmp_path / "out"),
                "--model",
                str(model),
                "--no-video",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=120,
        )
        os.close(slave)
        reader.join(timeout=10)
    finally:
        os.close(master)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "loops : 100%" in screen and "4/4" in screen
    assert "frames: 100%" in screen and "120/120" in screen
