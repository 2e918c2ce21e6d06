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
