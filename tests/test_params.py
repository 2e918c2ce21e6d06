import pytest

from schemas.errors import ConfigError
from schemas.params import load_params, parse_params
from tests.conftest import REPO


def test_default_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.dataset_config.processor_config.processor_type == "qwen2_5_vl"
    assert params.trainer_args.report_to == ["none"]  # a string is accepted as a one-element list


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError) as exc:
        parse_params({"dataset_config": {"packing_lenght": 4096}})
    assert "dataset_config.packing_lenght" in str(exc.value)
    assert "did you mean 'packing_length'" in str(exc.value)


def test_unknown_top_level_section_is_named():
    with pytest.raises(ConfigError, match="did you mean 'trainer_args'"):
        parse_params({"trainer_arg": {}})


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        parse_params({"trainer_args": {"learning_rate": -1, "sp_ulysses_degre": 2}})
    message = str(exc.value)
    assert "trainer_args.learning_rate" in message and "sp_ulysses_degre" in message


def test_bad_enum_value_is_rejected():
    with pytest.raises(ConfigError, match="packing_strategy"):
        parse_params({"dataset_config": {"packing_strategy": "next_fit"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_config: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_validate_memory_limit_is_a_duckdb_size():
    assert parse_params({"validate": {"memory_limit": "512MiB"}}).validate_.memory_limit == "512MiB"
    with pytest.raises(ConfigError, match="validate.memory_limit"):
        parse_params({"validate": {"memory_limit": "lots"}})


def test_params_yaml_is_in_the_style_dvc_writes_back(tmp_path):
    """`dvc exp run -S trainer_args.learning_rate=2e-4` rewrites params.yaml through DVC's own YAML round trip:
    the committed file is already in that style, so the experiment's diff is the one changed line."""
    import difflib
    import shutil

    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(str(tmp_path / "params.yaml"), ["trainer_args.learning_rate=2e-4"])
    before = (REPO / "params.yaml").read_text().splitlines()
    after = (tmp_path / "params.yaml").read_text().splitlines()
    diff = difflib.unified_diff(before, after, n=0, lineterm="")
    changed = [line for line in diff if not line.startswith(("---", "+++", "@@"))]
    assert changed == ["-  learning_rate: 0.0001", "+  learning_rate: 0.0002"], changed
