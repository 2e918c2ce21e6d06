import subprocess
import sys

import pytest
import yaml

from schemas.errors import ConfigError
from schemas.params import load_params
from stages.import_lmms import import_lmms
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "lmms"


def test_qwen2_5_vl_list_form_converts():
    report = import_lmms(FIXTURES / "qwen2_5_vl_docs_config.yaml")
    p = report.params
    assert p["dataset_config"]["processor_config"]["processor_type"] == "qwen2_5_vl"
    assert p["dataset_config"]["packing_length"] == 16384
    assert p["dataset_config"]["video_max_pixels"] == 50176
    assert p["dataset_config"]["datasets"] == [
        {"path": "path/to/your/dataset.parquet", "data_folder": "", "data_type": "parquet"}
    ]
    assert p["trainer_args"]["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2_5_VLDecoderLayer"]
    assert p["trainer_args"]["learning_rate"] == pytest.approx(1e-6)
    assert "dataset_config.dataset_format" in report.unmapped
    assert any("hub id" in n for n in report.notes)


def test_qwen3_vl_dumped_form_converts_and_reports():
    report = import_lmms(FIXTURES / "qwen3_vl_example_config.yaml")
    p = report.params
    # The example's processor_type is a placeholder ("nit"): inferred from the layer class, and said so.
    assert p["dataset_config"]["processor_config"]["processor_type"] == "qwen3_vl"
    assert "inferred 'qwen3_vl'" in report.unmapped["dataset_config.processor_config.processor_type"]
    assert p["trainer_args"]["use_liger_kernel"] is True and p["trainer_args"]["max_steps"] == 1000
    assert p["trainer_args"]["sp_ulysses_degree"] == 1
    assert report.unmapped["trainer_args.hub_token"].startswith("a Hugging Face Trainer argument")
    assert "trainer_args.fsdp_config.xla" in report.unmapped


def test_unsupported_values_are_dropped_with_reason(tmp_path):
    cfg = [
        {
            "type": "trainer",
            "config": {
                "trainer_type": "fsdp2_trainer",
                "dataset_config": {
                    "datasets": [{"path": "a", "data_type": "arrow"}, {"path": "b.jsonl", "data_type": "jsonl"}],
                    "packing_strategy": "balanced",
                },
                "model_config": {"load_from_pretrained_path": "/models/x"},
                "lr_scheduler_type": "cosine_with_restarts",
                "learning_rate": 2e-5,
            },
        }
    ]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = import_lmms(path)
    assert [d["path"] for d in report.params["dataset_config"]["datasets"]] == ["b.jsonl"]
    assert "dataset_config.datasets.0" in report.unmapped
    assert "balanced" in report.unmapped["dataset_config.packing_strategy"]
    assert "cosine_with_restarts" in report.unmapped["trainer_args.lr_scheduler_type"]
    assert report.params["trainer_args"]["learning_rate"] == pytest.approx(2e-5)


@pytest.mark.parametrize("processor_type", ["qwen2_vl", "qwen3_vl_moe"])
def test_every_family_processor_type_carries_over(tmp_path, processor_type):
    processor = {"processor_name": "/models/x", "processor_type": processor_type}
    cfg = {"trainer_type": "fsdp2_trainer", "dataset_config": {"processor_config": processor}, "trainer_args": {}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = import_lmms(path)
    assert report.params["dataset_config"]["processor_config"]["processor_type"] == processor_type
    assert not report.unmapped


def test_eval_keys_map_and_best_model_keys_are_explained(tmp_path):
    """HF's evaluation keys carry over; metric_for_best_model is explained (the best is by eval loss here); a
    load_best_model_at_end whose saves are not all evaluations is refused with the reason."""
    trainer = {"eval_strategy": "steps", "eval_steps": 50, "save_steps": 100, "load_best_model_at_end": True}
    cfg = [{"type": "trainer", "config": trainer | {"metric_for_best_model": "eval_loss"}}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = import_lmms(path)
    assert {k: report.params["trainer_args"][k] for k in trainer} == trainer
    assert "lowest eval_loss" in report.unmapped["trainer_args.metric_for_best_model"]
    path.write_text(yaml.safe_dump([{"type": "trainer", "config": trainer | {"save_steps": 75}}]))
    with pytest.raises(ConfigError, match="save_steps a multiple of eval_steps"):
        import_lmms(path)


def test_not_a_trainer_config(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("- type: dataset\n  config: {}\n")
    with pytest.raises(ConfigError, match="type: trainer"):
        import_lmms(path)


def test_cli_writes_a_params_file_that_loads(tmp_path):
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "import-lmms",
            str(FIXTURES / "qwen3_vl_example_config.yaml"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "not carried over" in proc.stderr
    assert load_params(out).dataset_config.processor_config.processor_type == "qwen3_vl"
