"""The CUDA machine's check (started by benchmarks/gpu_check.sh): installs nothing, writes every result as JSON
under one folder.

1. the GPU tests (tests/stages/test_train_gpu.py: the gpu-marked tests, and the CPU test of their tolerance;
   the smoke runs the gpu-marked ones only, which skip without CUDA);
2. `qvl train` of the demo on one GPU through torchrun (validate -> decode -> tokenize -> pack first; in-loop
   eval on the held-out packs), then `qvl evaluate` on the GPU (bf16 eval loss, greedy generations);
3. the training benchmark (benchmarks/train_gpu.py) for the Qwen2.5-VL-3B architecture at 16k packs.

Each step has a time limit sized so the whole check takes at most 8 minutes on one H100/H200; a step that fails
or times out is recorded and the next one runs. ``--smoke`` runs the same steps on any machine with the tiny
models, side by side (the CPU figures mean nothing; the check is that everything runs and agrees), in under 3
minutes on two CPU cores; CI runs it. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Seconds per step. CUDA: one after the other, 8 minutes in all. Smoke: side by side; a guard against hangs only
# (speed goals are not tests: it takes ~1.5 minutes of wall time on two idle cores, 126 s of CPU time in all).
LIMITS = {"tests": (120, 600), "demo_train": (90, 600), "benchmark": (265, 600)}


def run_step(cmd: list[str], cwd: Path, limit: float, log: Path) -> dict:
    """Run ``cmd``, output to ``log``; its exit status and time (``timed_out`` when it passed ``limit``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
    return {"returncode": code, "timed_out": code is None, "seconds": time.monotonic() - started, "log": log.name}


def junit_summary(path: Path) -> dict:
    """Counts and each test's outcome from pytest's JUnit XML."""
    if not path.is_file():
        return {"tests": []}
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    return {**counts, "tests": tests}


def gpu_tests(out: Path, limit: float, smoke: bool) -> dict:
    """tests/stages/test_train_gpu.py; the smoke selects only the gpu-marked tests (they skip without CUDA: the
    step's plumbing is what it checks; the test suite runs the file's CPU tolerance tests itself)."""
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/stages/test_train_gpu.py"]
    cmd += ["-m", "gpu"] if smoke else []
    cmd += [f"--junitxml={xml}"]
    result = {**run_step(cmd, REPO, limit, out / "tests.log"), **junit_summary(xml)}
    result["passed_all"] = result["returncode"] == 0 and not result.get("failure") and not result.get("error")
    return result


def demo_train(out: Path, limit: float, smoke: bool) -> dict:
    """The demo project in a temporary folder, trained by `qvl train` (torchrun, one process, one GPU)."""
    qvl = [sys.executable, "-m", "stages.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["trainer_args"] |= {"nproc_per_node": 1, "max_steps": 2 if smoke else 8, "save_steps": 1000}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        started, steps = time.monotonic(), []
        model = params["model_config"]["load_from_pretrained_path"]  # the tiny model params.yaml names
        family_name = params["dataset_config"]["processor_config"]["processor_type"]
        commands = {
            "demo": ["demo", "data/demo"],
            "make-tiny-model": ["make-tiny-model", "--family", family_name, model],
            **{stage: [stage] for stage in ("validate", "decode", "tokenize", "pack", "train", "evaluate")},
        }
        for name, command in commands.items():
            left = limit - (time.monotonic() - started)
            step = run_step(qvl + command, root, max(left, 1), out / f"demo_{name}.log")
            steps.append({"stage": name, **step})
            if step["returncode"] != 0:
                break
        found = {name: root / "metrics" / f"{name}.json" for name in ("train", "train_speed", "evaluate")}
        found = {name: json.loads(path.read_text()) for name, path in found.items() if path.is_file()}
        (out / "demo_train_metrics.json").write_text(json.dumps(found, indent=2))  # the losses, and the speed
    ok = all(s["returncode"] == 0 for s in steps) and len(steps) == len(commands)
    return {"passed_all": ok, "seconds": time.monotonic() - started, "stages": steps, "metrics": found or None}


def benchmark(out: Path, limit: float, smoke: bool) -> dict:
    bench_out = out / "train_gpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks/train_gpu.py"), "--out", str(bench_out)]
    if smoke:
        cmd += ["--smoke"]
    else:  # three configurations in ~4 minutes: each child's row search stops in time
        cmd += ["--steps", "4", "--warmup", "1", "--child-timeout-s", "70", "--child-deadline-s", "55"]
    result = run_step(cmd, REPO, limit, out / "benchmark.log")
    result["passed_all"] = result["returncode"] == 0 and bench_out.is_file()
    result["result"] = bench_out.name if bench_out.is_file() else None
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_results")
    ap.add_argument("--smoke", action="store_true", help="tiny models on any machine (goal on CPU: < 3 minutes)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    limits = {k: v[1 if args.smoke else 0] for k, v in LIMITS.items()}
    started = time.monotonic()
    summary: dict = {
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "limits_s": limits,
    }
    steps = {
        "tests": lambda: gpu_tests(out, limits["tests"], args.smoke),
        "demo_train": lambda: demo_train(out, limits["demo_train"], args.smoke),
        "benchmark": lambda: benchmark(out, limits["benchmark"], args.smoke),
    }
    if args.smoke:  # side by side: the CPU figures mean nothing, so the steps need not have the machine alone
        with ThreadPoolExecutor(len(steps)) as pool:
            futures = {name: pool.submit(fn) for name, fn in steps.items()}
            summary |= {name: f.result() for name, f in futures.items()}
    else:  # one after the other: each measurement has the GPU alone
        for name, fn in steps.items():
            print(f"== {name}", file=sys.stderr, flush=True)
            summary[name] = fn()
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"] = time.monotonic() - started
    summary["passed_all"] = all(summary[k]["passed_all"] for k in ("tests", "demo_train", "benchmark"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("passed_all", "seconds")}))
    return 0 if summary["passed_all"] else 1


if __name__ == "__main__":
    sys.exit(main())
