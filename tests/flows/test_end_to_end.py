"""End to end with the real components: `dvc repro` in a git clone, then a real Prefect server, process work
pool, worker and `prefect deployment run --watch` on the demo data, artifacts read back through the API."""

import sys

import pytest

from tests.flows.helpers import BIN, clone_project, edit_params, prefect_server, read_artifacts, sh, start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed project with the demo data and tiny models, training shortened."""
    return clone_project(tmp_path_factory.mktemp("e2e") / "project", max_steps=2, save_steps=1)


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
    hashes = rows[-1]["data_hashes"]
    assert {"validate", "decode", "tokenize", "pack"} <= set(hashes) and hashes["pack"]["data/packed"]
    assert len(rows[-1]["git_commit"]) >= 40
    metrics = sh(sys.executable, "-m", "dvc", "metrics", "show", "--json", cwd=clone).stdout
    assert "efficiency" in metrics and "final_loss" in metrics and "accepted" in metrics
    # A packing parameter reruns pack and what follows, never validate, decode or tokenize.
    edit_params(clone, dataset_config={"packing_strategy": "best_fit_decreasing"})
    third = sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    assert ran_stages(third.stdout)[0] == "pack" and not {"validate", "decode", "tokenize"} & set(
        ran_stages(third.stdout)
    )


def test_prefect_deployment_run_on_a_real_server_and_worker(clone, tmp_path):
    edit_params(clone, trainer_args={"max_steps": 3})  # so train and register really run under Prefect
    with prefect_server(tmp_path / "prefect-home") as env:
        sh(str(BIN / "prefect"), "work-pool", "create", "local-pool", "--type", "process", cwd=tmp_path, env=env)
        deploy = (
            f"from flows.pipeline import qwen_vl_pipeline\n"
            f"qwen_vl_pipeline.from_source({str(clone)!r}, entrypoint='flows/pipeline.py:qwen_vl_pipeline')"
            f".deploy(name='demo', work_pool_name='local-pool', build=False, push=False, "
            f"parameters={{'project_dir': {str(clone)!r}}})\n"
        )
        sh(sys.executable, "-c", deploy, cwd=clone, env=env)
        worker = start(str(BIN / "prefect"), "worker", "start", "--pool", "local-pool", cwd=clone, env=env)
        try:
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
            found = read_artifacts(clone, env)
        finally:
            stop(worker)
    assert {
        "validation-counts",
        "packing-efficiency",
        "training-progress",
        "loss-curve",
        "registered-checkpoint",
    } <= set(found)
    assert "demo@3-" in found["registered-checkpoint"] and "| pack | data/packed |" in found["registered-checkpoint"]
    assert float(found["training-progress"]) == 100.0
    from stages.register import read_registry

    assert [r["step"] for r in read_registry(clone / "registry/registry.duckdb")][-1] == 3
