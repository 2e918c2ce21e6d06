"""End to end with the real components: `dvc repro` in a git clone, then a real Prefect server, process work
pool, worker and `prefect deployment run --watch` on the demo data, artifacts read back through the API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(*cmd, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed project with the demo data and tiny models, training shortened."""
    root = tmp_path_factory.mktemp("e2e") / "project"
    sh("git", "clone", "-q", str(REPO), str(root), cwd=REPO)
    sh("git", "config", "user.email", "ci@example.invalid", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    sh(sys.executable, "-m", "stages.cli", "setup-demo", cwd=root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["trainer_args"].update(max_steps=2, save_steps=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_dvc_repro_end_to_end_then_nothing_then_only_what_changed(clone):
    first = sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    assert ran_stages(first.stdout) == ["validate", "decode", "tokenize", "pack", "train", "register"]
    second = sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    assert ran_stages(second.stdout) == []
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=clone).stdout
    from stages.register import read_registry

    rows = read_registry(clone / "registry/registry.duckdb")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["hf_path"] == "output/demo/hf"
    hashes = json.loads(rows[-1]["data_hashes"])
    assert {"validate", "decode", "tokenize", "pack"} <= set(hashes) and hashes["pack"]["data/packed"]
    assert len(rows[-1]["git_commit"]) >= 40
    metrics = sh(sys.executable, "-m", "dvc", "metrics", "show", "--json", cwd=clone).stdout
    assert "efficiency" in metrics and "final_loss" in metrics and "accepted" in metrics
    # A packing parameter reruns pack and what follows, never validate, decode or tokenize.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dataset_config"]["packing_strategy"] = "best_fit_decreasing"
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    assert ran_stages(third.stdout)[0] == "pack" and not {"validate", "decode", "tokenize"} & set(
        ran_stages(third.stdout)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("Prefect server did not become healthy")


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_prefect_deployment_run_on_a_real_server_and_worker(clone, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api}
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["trainer_args"]["max_steps"] = 3  # so train and register really run under Prefect
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker = None
    try:
        wait_healthy(api, server)
        sh(str(BIN / "prefect"), "work-pool", "create", "local-pool", "--type", "process", cwd=tmp_path, env=env)
        deploy = (
            f"from flows.pipeline import qwen_vl_pipeline\n"
            f"qwen_vl_pipeline.from_source({str(clone)!r}, entrypoint='flows/pipeline.py:qwen_vl_pipeline')"
            f".deploy(name='demo', work_pool_name='local-pool', build=False, push=False, "
            f"parameters={{'project_dir': {str(clone)!r}}})\n"
        )
        sh(sys.executable, "-c", deploy, cwd=clone, env=env)
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "local-pool"],
            cwd=clone,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        run = sh(
            str(BIN / "prefect"),
            "deployment",
            "run",
            "qwen_vl_pipeline/demo",
            "--watch",
            "--watch-timeout",
            "800",
            cwd=clone,
            env=env,
            timeout=900,
        )
        assert "Completed" in run.stdout + run.stderr
        check = (
            "import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "async def main():\n    async with get_client() as c:\n        arts = await c.read_artifacts()\n"
            "        print(json.dumps({a.key: a.data for a in arts if a.key}, default=str))\n"
            "asyncio.run(main())\n"
        )
        found = json.loads(sh(sys.executable, "-c", check, cwd=clone, env=env).stdout.strip().splitlines()[-1])
        assert {
            "validation-counts",
            "packing-efficiency",
            "training-progress",
            "loss-curve",
            "registered-checkpoint",
        } <= set(found)
        assert (
            "demo@3-" in found["registered-checkpoint"] and "| pack | data/packed |" in found["registered-checkpoint"]
        )
        assert float(found["training-progress"]) == 100.0
    finally:
        if worker:
            stop(worker)
        stop(server)
    from stages.register import read_registry

    assert [r["step"] for r in read_registry(clone / "registry/registry.duckdb")][-1] == 3
