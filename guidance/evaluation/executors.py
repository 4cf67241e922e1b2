"""Where loops run: this process, local worker processes, or an existing Dask cluster.

All three call the same top-level `evaluate_loop` on the same `LoopTask`s and return plain
result dicts, so the summary does not depend on which ran them (timing fields aside).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from guidance.errors import BadInputError

if TYPE_CHECKING:
    from guidance.evaluation.runner import LoopTask
    from guidance.settings import Settings

# The pipeline (OpenCV, onnxruntime) is imported where loops run, not here: `guidance evaluate`
# starts its worker processes before it imports any of it (WorkerPool).

DASK_CONNECT_TIMEOUT_S = 10.0


class Progress:
    """Two tqdm bars, loops and frames; silent when not on a TTY or when quiet."""

    def __init__(self, loops: int, frames: int | None, quiet: bool) -> None:
        from tqdm import tqdm

        disable = quiet or not sys.stderr.isatty()
        self.enabled = not disable
        self.loops = tqdm(total=loops, desc="loops ", unit="loop", position=0, disable=disable)
        self.frames = tqdm(total=frames, desc="frames", unit="fr", position=1, disable=disable, smoothing=0.1)
        self.by_loop: dict[str, int] = {}

    def put(self, item: tuple[str, int]) -> None:  # the queue interface the runner uses
        loop_id, n = item
        self.by_loop[loop_id] = self.by_loop.get(loop_id, 0) + n
        self.frames.update(n)

    def loop_done(self, result: dict) -> None:
        # executors that cannot stream frame progress (Dask) catch up here
        missing = (result.get("frames") or 0) - self.by_loop.get(result["loop_id"], 0)
        if missing > 0:
            self.put((result["loop_id"], missing))
        self.loops.update(1)
        if result["status"] == "failed":
            self.loops.write(f"failed: {result['loop_id']}: {result['reason']}")

    def close(self) -> None:
        self.frames.close()
        self.loops.close()


def limit_threads(threads: int) -> None:
    """One loop per core: BLAS/OpenMP and OpenCV pools sized to the worker's share."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import cv2

    cv2.setNumThreads(threads)


def run_serial(tasks: list[LoopTask], progress: Progress) -> Iterator[dict]:
    from guidance.evaluation.runner import evaluate_loop

    for task in tasks:
        task.progress = progress
        result = evaluate_loop(task)
        task.progress = None
        progress.loop_done(result)
        yield result


def _worker_init(threads: int, settings: Settings | None) -> None:
    """In each new worker: its thread budget, then (given the run's settings) the model loaded
    and warmed, before its first loop arrives. A model that fails here is left for the loop
    to report."""
    limit_threads(threads)
    if settings is None:
        return
    from guidance.evaluation.runner import shared_model

    with contextlib.suppress(Exception):  # evaluate_loop reports it, with the loop it failed
        shared_model(settings)


class WorkerPool:
    """Spawned worker processes (no fork: onnxruntime and OpenCV thread pools do not survive
    it), all started at once: `guidance evaluate` makes one as soon as it knows how many loops
    there are, so the workers import the pipeline and load the model while it is still
    checking every labels file and the model (about a third of a second a worker, otherwise
    spent before the first loop starts)."""

    def __init__(self, workers: int, threads: int, settings: Settings | None = None) -> None:
        self.executor = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads, settings),
        )
        # the executor spawns a worker per submitted call while none is idle: one each now
        for _ in range(workers):
            self.executor.submit(os.getpid)

    def submit(self, fn: Callable, *args) -> cf.Future:
        return self.executor.submit(fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def run_processes(
    tasks: list[LoopTask], workers: int, threads: int, progress: Progress, pool: WorkerPool | None = None
) -> Iterator[dict]:
    """Loops on local worker processes: `pool` (already started) or a new WorkerPool.

    A worker that dies (crash, out of memory) breaks the whole pool, so the loops caught in
    it are retried in a fresh pool, then each alone; only the loop that kills its own
    process is reported failed."""
    from guidance.evaluation.runner import evaluate_loop

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        remaining = list(tasks)
        for attempt in range(3):
            if not remaining:
                break
            isolate = attempt == 2
            batches = [[t] for t in remaining] if isolate else [remaining]
            remaining = []
            for batch in batches:
                for t in batch:
                    t.progress = q
                if pool is not None:  # started early by the caller: it serves the first batch
                    current, pool = pool, None
                else:
                    current = WorkerPool(1 if isolate else min(workers, len(batch)), threads)
                try:
                    futures = {current.submit(evaluate_loop, t): t for t in batch}
                    pending = set(futures)
                    while pending:
                        done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                        _drain(q, progress)
                        for fut in done:
                            task = futures[fut]
                            if isinstance(fut.exception(), BrokenProcessPool) and not isolate:
                                remaining.append(task)  # retried: maybe another loop's crash
                                continue
                            result = _result_or_failure(fut, task)
                            _drain(q, progress)
                            progress.loop_done(result)
                            yield result
                finally:
                    current.shutdown()
                for t in batch:
                    t.progress = None


def _drain(q, progress: Progress) -> None:
    while True:
        try:
            progress.put(q.get_nowait())
        except queue_mod.Empty:
            return
        except (EOFError, OSError):  # manager gone at shutdown
            return


def _result_or_failure(fut, task: LoopTask) -> dict:
    from guidance.evaluation.runner import base_result

    try:
        return fut.result()
    except Exception as exc:  # the worker process died (crash, out of memory) on this loop
        result = base_result(task.ref)
        result["failure"] = "worker"
        result["reason"] = f"worker failed: {type(exc).__name__}: {exc}"
        return result


def run_dask(tasks: list[LoopTask], address: str, progress: Progress) -> Iterator[dict]:
    """On an existing dask.distributed cluster; loop paths and --out must be visible to the
    workers (shared file system). Frame progress arrives per finished loop."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise BadInputError("--dask needs dask.distributed: pip install 'cement-guidance[cluster]'") from None
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT_S)
    except Exception as exc:  # distributed raises OSError, TimeoutError, ValueError ...
        raise BadInputError(
            f"--dask {address}: cannot connect to the scheduler ({type(exc).__name__}: {exc})"
        ) from None
    from guidance.evaluation.runner import evaluate_loop

    try:
        futures = {}
        for t in tasks:
            t.progress = None
            fut = client.submit(evaluate_loop, t, pure=False, key=f"evaluate-loop-{t.ref.slug}-{id(t)}")
            futures[fut] = t
        for fut in as_completed(list(futures)):
            result = _result_or_failure(fut, futures[fut])
            progress.loop_done(result)
            yield result
    finally:
        client.close()


def run_all(
    tasks: list[LoopTask],
    *,
    workers: int,
    threads: int,
    dask_address: str | None,
    progress: Progress,
    on_result: Callable[[dict], None] | None = None,
    pool: WorkerPool | None = None,
) -> list[dict]:
    """Every task's result, by Dask, local processes (`pool` where already started) or here."""
    if dask_address:
        it: Iterable[dict] = run_dask(tasks, dask_address, progress)
    elif workers > 1:
        it = run_processes(tasks, workers, threads, progress, pool)
    else:
        limit_threads(threads)
        it = run_serial(tasks, progress)
    results = []
    for r in it:
        if on_result:
            on_result(r)
        results.append(r)
    return results
