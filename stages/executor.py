"""Where a stage's chunks of work run: this process, a local forkserver pool, or Dask through Prefect.

Decode and tokenize hand their chunk function here (`map_chunks`); `orchestration.task_runner` picks the engine.
Results come back in chunk order whatever the engine, so the stage's outputs are byte-identical. The Dask path
lives in `flows/dask_runner.py` (Prefect's DaskTaskRunner) and is imported only when configured, so the stages
themselves never import Prefect.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from schemas.params import OrchestrationConfig

C = TypeVar("C")
R = TypeVar("R")


def map_chunks(
    fn: Callable[[C], R],
    chunks: Iterable[C],
    *,
    workers: int,
    config: OrchestrationConfig,
    name: str,
    init: Callable[..., None] | None = None,
    init_args: tuple[Any, ...] = (),
    preload: tuple[str, ...] = (),
    start_here: bool = False,
) -> Iterator[R]:
    """``fn`` over ``chunks``, results in chunk order. ``init(*init_args)`` runs once per worker process before
    its first chunk (in this process when ``workers`` is 1). ``fn``, ``init`` and the chunks must pickle, and
    ``fn`` / ``init`` must be module-level functions (or partials of them) importable by the workers. Locally,
    ``chunks`` is read only a little ahead of the results; Dask gets them all at once (a list). ``preload``:
    modules the local pool's workers need, imported once for all of them (see ``_pool``). ``start_here``: while
    the local pool's workers start, this process runs the first chunks itself (after ``init``; see
    ``_while_workers_start``). A generator: closing it early stops the pool (its running chunks finish first)."""
    if on_dask(config):
        chunks = list(chunks)
        if chunks:
            from flows.dask_runner import map_on_dask

            yield from map_on_dask(
                fn, chunks, address=config.dask_address, workers=workers, name=name, init=init, init_args=init_args
            )
    elif in_local_pool(workers, config):
        yield from _pool(fn, chunks, workers, init, init_args, preload, start_here)
    else:
        yield from _in_process(fn, chunks, init, init_args)


def on_dask(config: OrchestrationConfig) -> bool:
    """Whether ``map_chunks`` hands the chunks to Dask (which pickles each one apart, for workers that may be
    other machines)."""
    return config.task_runner == "dask"


def in_local_pool(workers: int, config: OrchestrationConfig) -> bool:
    """Whether ``map_chunks`` runs the chunks in worker processes on this machine (not in this process, not on
    Dask): workers that see this process's files."""
    return not on_dask(config) and workers > 1


def _in_process(fn, chunks, init, init_args) -> Iterator:
    """One worker: no process start-up (seconds with torch and transformers) for work this small."""
    if init is not None:
        init(*init_args)
    return map(fn, chunks)


def _pool(fn, chunks, workers, init, init_args, preload, start_here) -> Iterator:
    """A forkserver pool (forking a parent that runs torch threads can deadlock); shut down once exhausted.
    About two chunks per worker are in flight: Executor.map (Python 3.11) would read every chunk first.
    The forkserver imports ``preload`` before it forks the workers, so N workers pay one import, not N (torch:
    3.3-4 s of CPU each, measured; the forkserver starts no threads, so forking it is safe). It applies where
    this process starts its forkserver (its first pool), as a stage run by DVC or a flow does."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *preload])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=init_args) as pool:
        chunks, in_flight = iter(chunks), deque()
        if start_here:
            yield from _while_workers_start(pool, workers, fn, chunks, in_flight, init, init_args)
        for chunk in chunks:
            in_flight.append(pool.submit(fn, chunk))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _while_workers_start(pool, workers, fn, chunks: Iterator, in_flight: deque, init, init_args) -> Iterator:
    """Run chunks in this process, in order, until ``pool``'s workers are up. A worker starts only once the
    forkserver has imported the preloads (torch: 1.6 s here), and this process would wait with a core idle. Once
    a worker is up, the starting thread hands the pool the next chunks at once (into ``in_flight``; those submits
    start any worker not yet started), so the pool does not wait for the chunk still running here. ``init`` runs
    here for these chunks and is undone after them where it returns an undo function."""
    lock, up, failed = threading.Lock(), threading.Event(), []

    def start_workers() -> None:
        try:
            for started in [pool.submit(int) for _ in range(workers)]:  # each submit may start one worker
                started.result()
        except BaseException as exc:  # a forkserver that died (EOFError), a broken pool: raised in the caller
            failed.append(exc)
        with lock:  # the next chunks and "up" together: none is taken here after these
            try:
                for chunk in itertools.islice(chunks, 0 if failed else 2 * workers):
                    in_flight.append(pool.submit(fn, chunk))
            except BaseException as exc:  # the chunks' own iterator may raise too
                failed.append(exc)
            finally:
                up.set()

    threading.Thread(target=start_workers, name="pool-start", daemon=True).start()
    undo = init(*init_args) if init is not None else None
    try:
        while True:
            with lock:
                chunk = _END if up.is_set() else next(chunks, _END)
            if chunk is _END:
                break
            yield fn(chunk)
    finally:
        if callable(undo):
            undo()
    up.wait()
    if failed:
        raise failed[0]


_END = object()
