"""Reads and actions on a real Prefect server for the flow tests, run as a subprocess with that server's env
(`python -m tests.flows.prefect_api <command> [args]`), printing JSON: a test's own process keeps no Prefect client
state between servers."""

from __future__ import annotations

import asyncio
import json
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterId


def _task_run(r) -> dict:
    return {
        "id": str(r.id),
        "name": r.name,
        "state": r.state.name,
        "message": r.state.message,
        "run_count": r.run_count,
    }


async def task_runs(flow_run_id: str) -> list[dict]:
    """The flow run's task runs in the order they started."""
    async with get_client() as c:
        runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [_task_run(r) for r in sorted(runs, key=lambda r: r.start_time or r.expected_start_time)]


async def task_run(task_run_id: str) -> dict:
    async with get_client() as c:
        (run,) = await c.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=[task_run_id])))
    return _task_run(run)


async def flow_run(flow_run_id: str) -> dict:
    async with get_client() as c:
        run = await c.read_flow_run(flow_run_id)
    return {"id": str(run.id), "state": run.state.name, "message": run.state.message}


async def start_deployment(name: str) -> dict:
    """Create a flow run of the deployment ``name`` and return at once (a worker picks it up)."""
    from prefect.deployments import run_deployment

    run = await run_deployment(name, timeout=0)
    return {"id": str(run.id), "state": run.state.name, "message": run.state.message}


COMMANDS = {"task-runs": task_runs, "task-run": task_run, "flow-run": flow_run, "start-deployment": start_deployment}

if __name__ == "__main__":
    print(json.dumps(asyncio.run(COMMANDS[sys.argv[1]](*sys.argv[2:]))))
