"""Shared fixtures: the tiny models and the demo dataset are built once per test session (offline)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of a tiny random model with a real processor."""
    from stages.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {fam: make_tiny_model(fam, root / f"tiny-{fam}") for fam in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from stages.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo-src") / "demo")


@pytest.fixture
def project(tmp_path, demo_dir) -> Path:
    """A fresh project root holding a copy of the demo data at data/demo."""
    shutil.copytree(demo_dir, tmp_path / "data" / "demo")
    return tmp_path


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
                **trainer,
            },
            "validate": {"media_cache": ".cache/media.duckdb"},
        }
    )


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen3_vl"])
def packed_project(request, tiny_models, demo_dir, tmp_path_factory):
    """A project root with validate, decode, tokenize and pack done on the demo data for one family."""
    from stages.decode import run as decode
    from stages.pack import run as pack
    from stages.tokenize import run as tokenize
    from stages.validate import run as validate

    root = tmp_path_factory.mktemp(f"packed-{request.param}")
    shutil.copytree(demo_dir, root / "data/demo")
    params = pipeline_params(tiny_models[request.param], request.param)
    for stage in (validate, decode, tokenize, pack):
        stage(params, root)
    return root, request.param, tiny_models[request.param]
