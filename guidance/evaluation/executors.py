"""Where loops run: this process, local worker processes, or an existing Dask cluster.

All three call the same top-level `evaluate_loop` on the same `LoopTask`s and return plain
result dicts, so the summary does not depend on which ran them (timing fields aside).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue as queue_mod
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool

from guidance.errors import BadInputError
from guidance.evaluation.runner import LoopTask, base_result, evaluate_loop

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
    for task in tasks:
        task.progress = progress
        result = evaluate_loop(task)
        task.progress = None
        progress.loop_done(result)
        yield result


def _worker_init(threads: int) -> None:
    limit_threads(threads)


def run_processes(tasks: list[LoopTask], workers: int, threads: int, progress: Progress) -> Iterator[dict]:
    """Spawned processes (no fork: onnxruntime and OpenCV thread pools do not survive it).

    A worker that dies (crash, out of memory) breaks the whole pool, so the loops caught in
    it are retried in a fresh pool, then each alone; only the loop that kills its own
    process is reported failed."""
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
                n = 1 if isolate else min(workers, len(batch))
                with cf.ProcessPoolExecutor(
                    max_workers=n, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
                ) as pool:
                    futures = {pool.submit(evaluate_loop, t): t for t in batch}
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
) -> list[dict]:
    if dask_address:
        it: Iterable[dict] = run_dask(tasks, dask_address, progress)
    elif workers > 1:
        it = run_processes(tasks, workers, threads, progress)
    else:
        limit_threads(threads)
        it = run_serial(tasks, progress)
    results = []
    for r in it:
        if on_result:
            on_result(r)
        results.append(r)
    return results
