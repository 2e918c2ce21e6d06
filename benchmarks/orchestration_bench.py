"""Orchestration overhead (issue 7).

Default: a fully cached rerun through `dvc repro` and through the Prefect flow (`qvl run`, ephemeral Prefect), and
the flow's overhead over the stages run directly.

`--executors`: decode and tokenize on the demo data (`python -m stages.<name>`, wall time per stage process) with
the local pool and with orchestration.task_runner: dask, on a temporary local cluster and on an existing
`dask scheduler` + `dask worker` (warm), with ephemeral Prefect and with a running Prefect server.

Usage (in a project where the demo pipeline has run once): python benchmarks/orchestration_bench.py [--executors]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
ENV.pop("PREFECT_API_URL", None)


def timed(*cmd: str, cwd: Path | None = None, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env or ENV, cwd=cwd)
    return time.perf_counter() - start


def cached_rerun() -> None:
    dvc = min(timed(sys.executable, "-m", "dvc", "repro") for _ in range(3))
    flow = min(timed(sys.executable, "-m", "stages.cli", "run") for _ in range(2))
    status = min(timed(sys.executable, "-m", "dvc", "status") for _ in range(3))
    print(f"cached rerun through dvc repro: {dvc:.2f} s (goal < 3 s)")
    print(f"cached rerun through the Prefect flow (qvl run, ephemeral): {flow:.2f} s (goal < 15 s)")
    print(
        f"Prefect overhead over the same cached stages: {flow - dvc:.2f} s (six tasks, artifacts, temporary "
        f"server); dvc status alone: {status:.2f} s"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*cmd: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def stage_times(root: Path, env: dict, orchestration: dict, repeats: int) -> tuple[float, float]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestration"] = {"task_runner": "local", "dask_address": None, **orchestration}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = [sys.executable, "-m", "stages.{}", "--params", "params.yaml"]
    return tuple(
        min(timed(*[c.format(name) for c in run], cwd=root, env=env) for _ in range(repeats))
        for name in ("decode", "tokenize")
    )


def executors(repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="qvl-exec-bench-"))
    root = work / "project"
    (root / "data").mkdir(parents=True)
    shutil.copytree("data/demo", root / "data/demo")
    params = yaml.safe_load(Path("params.yaml").read_text())
    for key in ("processor_config",):
        cfg = params["dataset_config"][key]
        cfg["processor_name"] = str(Path(cfg["processor_name"]).resolve())
    params["model_config"]["load_from_pretrained_path"] = str(
        Path(params["model_config"]["load_from_pretrained_path"]).resolve()
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**ENV, "PREFECT_HOME": str(work / "prefect-home"), "PYTHONPATH": str(Path.cwd())}
    subprocess.run(
        [sys.executable, "-m", "stages.validate", "--params", "params.yaml"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    rows = [("local pool", stage_times(root, env, {}, repeats))]
    rows.append(("dask, temporary local cluster", stage_times(root, env, {"task_runner": "dask"}, repeats)))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(BIN / "dask")
    procs = [start(dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", env=env)]
    procs.append(
        start(
            dask,
            "worker",
            address,
            "--host",
            "127.0.0.1",
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--no-dashboard",
            env=env,
        )
    )
    try:
        sys.path.insert(0, str(Path.cwd()))
        from flows.dask_runner import check_scheduler

        check_scheduler(address)
        on_scheduler = {"task_runner": "dask", "dask_address": address}
        stage_times(root, env, on_scheduler, 1)  # warm the workers (imports)
        rows.append(("dask, existing scheduler (warm workers)", stage_times(root, env, on_scheduler, repeats)))
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}/api"
        server_env = {**env, "PREFECT_API_URL": api}
        procs.append(
            start(
                str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port), env=server_env
            )
        )
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        rows.append(("dask, existing scheduler + Prefect server", stage_times(root, server_env, on_scheduler, repeats)))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    print(f"decode / tokenize on the demo data, wall seconds per stage process (best of {repeats}):")
    for name, (dec, tok) in rows:
        print(f"  {name:45s} decode {dec:6.2f} s   tokenize {tok:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", action="store_true", help="local pool vs Dask for decode and tokenize")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not Path("dvc.lock").is_file() or not Path("data/demo").is_dir():
        sys.exit("run the demo pipeline once first (bash scripts/demo.sh)")
    if args.executors:
        executors(args.repeats)
    else:
        cached_rerun()


if __name__ == "__main__":
    main()
