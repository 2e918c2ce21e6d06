"""Run a stage's chunk function on Dask through Prefect's DaskTaskRunner (`orchestration.task_runner: dask`).

A small Prefect flow maps one task over the chunks on an existing Dask scheduler (`orchestration.dask_address`)
or, without an address, on a temporary local cluster of `workers` single-threaded processes; it yields the
results in chunk order, so the stage writes the same bytes as with its local pool. The workers must import this
project (same code) and see the project directory at the same path.

Without `PREFECT_API_URL` the flow reports to a temporary Prefect server started here, and the Dask tasks are
pointed at that same server (otherwise every Dask worker process would start its own).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from schemas.errors import PipelineError

CONNECT_TIMEOUT_S = 10
WORKERS_TIMEOUT_S = 60

_ready: str | None = None  # in a Dask worker process: the stage run whose initializer already ran here
_lock = threading.Lock()


@task(name="chunk", cache_policy=NO_CACHE, task_run_name="{name}-chunk-{index}")
def run_chunk(fn: Callable, chunk: Any, index: int, name: str, init: Callable | None, init_args: tuple, run_id: str):
    """One chunk on a Dask worker (Prefect ships this task by value: the state lives in `_initialised_call`)."""
    return _initialised_call(fn, chunk, init, init_args, run_id)


def _initialised_call(fn: Callable, chunk: Any, init: Callable | None, init_args: tuple, run_id: str):
    """``fn(chunk)`` after the stage's per-process initializer (run once per process and stage run; chunks that
    need it run one at a time within a process, since it sets process-wide state)."""
    global _ready
    if init is None:
        return fn(chunk)
    with _lock:
        if _ready != run_id:
            init(*init_args)
            _ready = run_id
        return fn(chunk)


def chunks_flow(fn: Callable, chunks: Sequence, name: str, init: Callable | None, init_args: tuple):
    """A flow without parameters (the chunks stay out of the flow run record the server stores) that maps
    `run_chunk` over the chunks on its task runner and yields the results in order as they finish."""
    run_id = uuid.uuid4().hex  # this run's initializer: a long-lived worker re-initialises for every stage run

    @flow(name="qvl-chunks", validate_parameters=False)
    def qvl_chunks() -> Iterator:
        futures = run_chunk.map(
            unmapped(fn),
            chunks,
            range(len(chunks)),
            unmapped(name),
            unmapped(init),
            unmapped(init_args),
            unmapped(run_id),
        )
        for future in futures:
            yield future.result()

    return qvl_chunks


def map_on_dask(
    fn: Callable,
    chunks: Sequence,
    *,
    address: str | None,
    workers: int,
    name: str,
    init: Callable | None = None,
    init_args: tuple = (),
) -> Iterator:
    """``fn`` over ``chunks`` on Dask (see the module doc); a scheduler that cannot be used is a PipelineError."""
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        check_scheduler(address)
        runner = DaskTaskRunner(address=address)
        where = address
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": max(1, workers),
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
            }
        )
        where = f"a temporary local cluster of {max(1, workers)} workers"
    run_name = f"{name}: {len(chunks)} chunks on {where}"
    with _prefect_api():
        yield from chunks_flow(fn, chunks, name, init, init_args).with_options(
            task_runner=runner, flow_run_name=run_name
        )()


def check_scheduler(address: str) -> None:
    """A Dask scheduler answers at ``address`` and has at least one worker, or a one-line PipelineError."""
    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port

    hint = "start one (`dask scheduler` and `dask worker ADDRESS`) or set orchestration.task_runner: local"
    try:
        with socket.create_connection(parse_host_port(parse_address(address)[1]), timeout=CONNECT_TIMEOUT_S):
            pass  # a refused connection fails here at once; the client below would retry until its timeout
        client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
    except Exception as exc:  # OSError (refused, timed out), ValueError (bad address), comm errors
        raise PipelineError(
            f"orchestration.dask_address {address}: no Dask scheduler answers ({type(exc).__name__}: {exc}); {hint}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise PipelineError(
            f"orchestration.dask_address {address}: the scheduler has no worker after {WORKERS_TIMEOUT_S} s; "
            f"start workers with `dask worker {address}`"
        ) from None
    finally:
        client.close()


@contextlib.contextmanager
def _prefect_api() -> Iterator[None]:
    """Use the configured Prefect API; without one, start the temporary server once and hand its URL to the
    Dask tasks through the settings Prefect serialises with each task."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield
