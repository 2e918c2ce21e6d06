"""What the flow tests share: running commands, cloning the committed project, and starting and stopping real
servers and workers (a Prefect server, Prefect workers, a Dask scheduler and its workers) on loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.conftest import REPO, built_once

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def sh(*cmd, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a command; a non-zero exit fails the test with the ends of its output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _demo_clone() -> Path:
    """A git clone of the committed project after `qvl setup-demo`, made once per test process (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="qvl-demo-clone-")) / "project"
    atexit.register(shutil.rmtree, root.parent, ignore_errors=True)
    sh("git", "clone", "-q", str(REPO), str(root), cwd=REPO)
    sh("git", "config", "user.email", "ci@example.invalid", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    sh(sys.executable, "-m", "stages.cli", "setup-demo", cwd=root)
    return root


def clone_project(root: Path, **trainer_args) -> Path:
    """A fresh git clone of the committed project at ``root`` with the demo data and tiny models (a copy of one
    made once per test process: `qvl setup-demo` costs ~14 s of CPU); the given trainer_args override params.yaml
    (e.g. max_steps=2, save_steps=1 to keep training short)."""
    shutil.copytree(built_once("demo-clone", _demo_clone), root, symlinks=True)
    if trainer_args:
        edit_params(root, trainer_args=trainer_args)
    return root


def edit_params(root: Path, **sections: dict) -> None:
    """Update keys of params.yaml sections in place (a section missing from the file is created)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*cmd, cwd, env, log: Path | None = None) -> subprocess.Popen:
    """A long-running process in its own process group (so `stop` reaches everything it starts)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    """Stop a process group started by `start`: SIGINT (a Prefect worker may hang on SIGTERM), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_listening(host: str, port: int, proc: subprocess.Popen, seconds: float = 90) -> None:
    """Until ``proc`` accepts TCP connections on host:port (a loaded CI machine may take many seconds)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args[:2]} exited before listening on {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} after {seconds} s")


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


@contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real Prefect server on a free loopback port with its own PREFECT_HOME; yields the env that uses it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**ENV, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    server = start(
        str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), cwd=home.parent, env=env
    )
    try:
        wait_healthy(api, server)
        yield env
    finally:
        stop(server)


def read_artifacts(cwd: Path, env: dict[str, str]) -> dict[str, str]:
    """Every keyed artifact on the server, key -> data (the latest of each key), read through the API."""
    import json

    check = (
        "import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
        "async def main():\n    async with get_client() as c:\n        arts = await c.read_artifacts()\n"
        "        print(json.dumps({a.key: a.data for a in arts if a.key}, default=str))\n"
        "asyncio.run(main())\n"
    )
    return json.loads(sh(sys.executable, "-c", check, cwd=cwd, env=env).stdout.strip().splitlines()[-1])


def prefect_api(env: dict[str, str], command: str, *args: str):
    """`tests/flows/prefect_api.py <command> <args>` against the server that ``env`` points at; its JSON answer."""
    import json

    out = sh(sys.executable, "-m", "tests.flows.prefect_api", command, *args, cwd=REPO, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def processes_in(root: Path, *markers: str) -> list[str]:
    """Command lines of the live processes working in ``root`` whose command line contains one of ``markers``
    (read from /proc: other projects' processes on this machine are not counted)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if cwd == str(root) and "zombie" not in state and any(m in cmdline for m in markers):
            found.append(f"{pid}: {cmdline}")
    return found
