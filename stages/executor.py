"""Where a stage's chunks of work run: this process, a local forkserver pool, or Dask through Prefect.

Decode and tokenize hand their chunk function here (`map_chunks`); `orchestration.task_runner` picks the engine.
Results come back in chunk order whatever the engine, so the stage's outputs are byte-identical. The Dask path
lives in `flows/dask_runner.py` (Prefect's DaskTaskRunner) and is imported only when configured, so the stages
themselves never import Prefect.
"""

from __future__ import annotations

import multiprocessing
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
) -> Iterator[R]:
    """``fn`` over ``chunks``, results in chunk order. ``init(*init_args)`` runs once per worker process before
    its first chunk (in this process when ``workers`` is 1). ``fn``, ``init`` and the chunks must pickle, and
    ``fn`` / ``init`` must be module-level functions (or partials of them) importable by the workers. Locally,
    ``chunks`` is read only a little ahead of the results; Dask gets them all at once (a list). ``preload``:
    modules the local pool's workers need, imported once for all of them (see ``_pool``)."""
    if config.task_runner == "dask":
        chunks = list(chunks)
        if not chunks:
            return iter(())
        from flows.dask_runner import map_on_dask

        return map_on_dask(
            fn, chunks, address=config.dask_address, workers=workers, name=name, init=init, init_args=init_args
        )
    if not in_local_pool(workers, config):
        return _in_process(fn, chunks, init, init_args)
    return _pool(fn, chunks, workers, init, init_args, preload)


def in_local_pool(workers: int, config: OrchestrationConfig) -> bool:
    """Whether ``map_chunks`` runs the chunks in worker processes on this machine (not in this process, not on
    Dask): workers that see this process's files."""
    return config.task_runner != "dask" and workers > 1


def _in_process(fn, chunks, init, init_args) -> Iterator:
    """One worker: no process start-up (seconds with torch and transformers) for work this small."""
    if init is not None:
        init(*init_args)
    return map(fn, chunks)


def _pool(fn, chunks, workers, init, init_args, preload) -> Iterator:
    """A forkserver pool (forking a parent that runs torch threads can deadlock); shut down once exhausted.
    At most two chunks per worker are in flight: Executor.map (Python 3.11) would read every chunk first.
    The forkserver imports ``preload`` before it forks the workers, so N workers pay one import, not N (torch:
    3.3-4 s of CPU each, measured; the forkserver starts no threads, so forking it is safe). It applies where
    this process starts its forkserver (its first pool), as a stage run by DVC or a flow does."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *preload])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=init_args) as pool:
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(fn, chunk))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
