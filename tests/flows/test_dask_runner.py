"""Decode and tokenize on Dask through Prefect's DaskTaskRunner (orchestration.task_runner: dask): a real
`dask scheduler` and `dask worker` on loopback, and a temporary local cluster, give the same output bytes as the
local pool; a scheduler that does not answer is one clear error line."""

import json
import re
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from schemas.errors import ConfigError
from schemas.params import parse_params
from stages.executor import map_chunks
from tests.conftest import REPO, pipeline_params
from tests.flows.helpers import BIN, ENV, edit_params, free_port, sh, start, stop, wait_listening

OUTPUTS = ("data/frames", "data/tokenized")


def outputs(root) -> dict[str, bytes]:
    """Every output file's bytes (reject details included: ffmpeg's object addresses are stripped)."""
    return {
        f"{folder}/{path.name}": path.read_bytes() for folder in OUTPUTS for path in sorted((root / folder).iterdir())
    }


def run_stages(root, env, *names) -> str:
    out = ""
    for name in names:
        proc = sh(sys.executable, "-m", f"stages.{name}", "--params", "params.yaml", cwd=root, env=env, timeout=600)
        out += proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_dir, tiny_models):
    """The demo project after validate, decode and tokenize with the local pool; returns it with its outputs."""
    root = tmp_path_factory.mktemp("dask") / "project"
    shutil.copytree(demo_dir, root / "data/demo")
    params = pipeline_params(tiny_models["qwen2_5_vl"], "qwen2_5_vl")
    params.decode.workers = 2  # the local pool, which Dask must equal, and the temporary cluster's size
    (root / "params.yaml").write_text(params.model_dump_json(by_alias=True))
    env = {**ENV, "PREFECT_HOME": str(root.parent / "prefect-home"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # ephemeral Prefect: the stage starts (and shares) a temporary server
    run_stages(root, env, "validate", "decode", "tokenize")
    return root, env, outputs(root)


def use_dask(root, address=None) -> None:
    edit_params(root, orchestration={"task_runner": "dask", "dask_address": address})


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real Dask scheduler and two single-threaded worker processes on loopback, importing this project."""
    logs = tmp_path_factory.mktemp("dask-logs")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**ENV, "PYTHONPATH": str(REPO)}
    host, port = address.removeprefix("tcp://").split(":")
    dask = str(BIN / "dask")
    scheduler = start(
        dask, "scheduler", "--host", host, "--port", port, "--no-dashboard", cwd=REPO, env=env, log=logs / "s.log"
    )
    try:
        wait_listening(host, int(port), scheduler)  # check_scheduler fails at once on a refused connection
        workers = start(
            dask, "worker", address, "--host", host, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
            cwd=REPO, env=env, log=logs / "w.log",
        )  # fmt: skip
        try:
            from flows.dask_runner import check_scheduler

            check_scheduler(address)  # waits until a worker has joined
            yield address, logs / "w.log"
        finally:
            stop(workers, signal.SIGTERM)
    finally:
        stop(scheduler, signal.SIGTERM)


@pytest.mark.slow
def test_decode_and_tokenize_on_an_existing_dask_scheduler_equal_the_local_pool(project, dask_cluster):
    root, env, local = project
    address, worker_log = dask_cluster
    use_dask(root, address)
    log = run_stages(root, env, "decode", "tokenize")
    assert outputs(root) == local
    videos = len(pq.read_table(root / "data/frames/index.parquet")) + len(
        pq.read_table(root / "data/frames/rejects.parquet")
    )
    assert f"decode: {videos} chunks on {address}" in log and f"tokenize: 1 chunks on {address}" in log
    ran = re.findall(r"Task run '(\w+-chunk-\d+)' - Finished in state Completed", worker_log.read_text())
    assert sorted(ran) == sorted([f"decode-chunk-{i}" for i in range(videos)] + ["tokenize-chunk-0"])
    # The tokenize initializer (processor, frame store) ran in a Dask worker process, not in the stage.
    from distributed import Client

    with Client(address, timeout="10s") as client:
        ready = client.run(lambda: __import__("flows.dask_runner").dask_runner._ready)
    assert any(ready.values())


@pytest.mark.slow
def test_temporary_local_dask_cluster_equals_the_local_pool(project):
    root, env, local = project
    use_dask(root)
    log = run_stages(root, env, "decode")  # tokenize's chunks take the same path (test above)
    assert outputs(root) == local
    assert "chunks on a temporary local cluster of 2 workers" in log


@pytest.mark.slow
def test_unreachable_dask_scheduler_is_one_clear_error_and_nothing_is_replaced(project):
    root, env, local = project
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    use_dask(root, address)
    proc = run_failing(root, env, "decode")
    assert proc.returncode == 2
    assert f"qvl decode: error: orchestration.dask_address {address}: no Dask scheduler answers" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert outputs(root) == local


def run_failing(root, env, stage):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "orchestration, message",
    [
        ({"task_runner": "ray"}, "orchestration.task_runner: Input should be 'local' or 'dask'"),
        ({"task_runner": "dask", "dask_address": "http//x"}, "expected a Dask scheduler address"),
        ({"dask_address": "tcp://10.0.0.5:8786"}, "dask_address is set but task_runner is 'local'"),
        ({"gpu_deployment": "train-gpu"}, "expected FLOW/DEPLOYMENT"),
    ],
)
def test_bad_orchestration_config_is_a_clear_error(orchestration, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params({"orchestration": orchestration})


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_local_map_chunks_keeps_chunk_order(workers):
    config = parse_params({}).orchestration
    assert list(map_chunks(_square, list(range(7)), workers=workers, config=config, name="t")) == [
        x * x for x in range(7)
    ]


def test_local_pool_reads_the_chunks_only_a_little_ahead():
    """Tokenize streams its samples through map_chunks: the pool holds at most two chunks per worker, so a
    dataset's chunks are never all read at once (Executor.map would read all 20 before the first result)."""
    pulled = []

    def chunks():
        for i in range(20):
            pulled.append(i)
            yield i

    results = map_chunks(_square, chunks(), workers=2, config=parse_params({}).orchestration, name="t")
    assert next(results) == 0 and len(pulled) <= 4
    assert list(results) == [x * x for x in range(1, 20)]


def _start_here(tmp_path, preload: str, chunks: int) -> subprocess.CompletedProcess:
    """map_chunks(start_here=True) in a fresh interpreter (a process's first pool sets the forkserver's preloads),
    preloading a module of source ``preload``; each chunk takes 0.2 s and says which process ran it."""
    (tmp_path / "the_preload.py").write_text(preload)
    where = "import os, time\n\ndef where(x):\n    time.sleep(0.2)\n    return x, os.getpid()\n"
    (tmp_path / "chunk_fn.py").write_text(where)
    script = f"""
import json, os, sys
sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]
from chunk_fn import where
from schemas.params import parse_params
from stages.executor import map_chunks
results = map_chunks(where, range({chunks}), workers=2, config=parse_params({{}}).orchestration, name="t",
                     preload=("the_preload",), start_here=True)
print(json.dumps({{"parent": os.getpid(), "results": list(results)}}))
"""
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_this_process_runs_the_first_chunks_while_the_pool_starts(tmp_path):
    """start_here (decode): while the forkserver imports a slow preload (torch: seconds), the calling process runs
    the first chunks itself, then the pool's workers take the rest; results stay in chunk order."""
    done = _start_here(tmp_path, "import time\ntime.sleep(2.0)\n", 40)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [x for x, _ in out["results"]] == list(range(40))
    here = [x for x, pid in out["results"] if pid == out["parent"]]
    assert here and here == list(range(len(here))) and len(here) < 40  # the first ones here, the rest in workers


def test_a_pool_that_cannot_start_is_an_error_not_a_hang(tmp_path):
    """A preload that raises kills the forkserver: the caller gets the pool's error once its own chunks are done,
    instead of waiting forever for workers that never come up."""
    done = _start_here(tmp_path, "import time\ntime.sleep(0.5)\nraise RuntimeError('broken preload')\n", 6)
    assert done.returncode != 0 and "Traceback" in done.stderr
