"""What the Prefect artifacts show a person: the loss chart (the train stage's SVG, inlined as a markdown image the
UI renders) with a rounded table, and the checkpoint's metrics table and this run's lineage."""

import base64
import json
import re

import yaml

from flows.artifacts import GENERATION_COLUMNS, checkpoint_markdown, generations, loss_markdown, packing_markdown
from stages.train.plot import loss_svg
from stages.train.telemetry import write_outputs

HISTORY = [
    {"step": s, "loss": 2.0 / s + 0.000123456789, "lr": 1e-4 * s / 30, "tokens": 100, "label_tokens": 40}
    for s in range(1, 31)
]
LONG_FLOAT = re.compile(r"\d\.0*[1-9]\d{4,}")  # more than 4 significant digits: 0.00009045084971874738


def test_loss_chart_is_the_train_stages_svg_inlined_with_a_rounded_table(tmp_path):
    write_outputs(tmp_path, HISTORY, {"final_loss": HISTORY[-1]["loss"], "steps": 30}, {})
    svg = (tmp_path / "plots/train_loss.svg").read_text()
    assert svg == loss_svg(HISTORY) and svg.startswith("<svg") and svg.count("<circle") == 30
    markdown = loss_markdown(tmp_path)
    uri = re.search(r"!\[[^\]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert uri and base64.b64decode(uri.group(1)).decode() == svg  # the same chart as the file DVC shows
    rows = [r for r in markdown.splitlines() if re.match(r"\| \d+ \|", r)]
    assert len(rows) == 20 and rows[0].startswith("| 1 |") and rows[-1].startswith("| 30 |")  # sampled, ends kept
    assert rows[0] == "| 1 | 2 | 3.33e-06 | 100 |" and rows[-1] == "| 30 | 0.06679 | 1.00e-04 | 100 |"
    assert not LONG_FLOAT.search(markdown.split("](data:")[0] + markdown.split(")", 1)[1])


def test_checkpoint_artifact_has_a_metrics_table_and_this_runs_lineage(tmp_path):
    lock = {"stages": {"pack": {"outs": [{"path": "data/packed", "md5": "new.dir"}]}, "register": {"cmd": "x"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    latest = {
        "id": "demo@2-abc",
        "run": "demo",
        "step": 2,
        "path": "output/demo/checkpoint-2",
        "hf_path": "output/demo/hf",
        "params_hash": "p",
        "git_commit": "c0ffee",
        "data_hashes": {"pack": {"data/packed": "stale.dir"}},
        "metrics": {
            "loss": 1.234567891,
            "lr": 0.00009045084971874738,
            "steps": 2,
            "speed": {"tokens_per_s": 1234.56789, "mfu": None, "mfu_convention": "6*N_lm*tokens + " * 5},
        },
    }
    markdown = checkpoint_markdown(tmp_path, latest)
    assert "| loss | 1.235 |" in markdown and "| lr | 9.05e-05 |" in markdown and "| steps | 2 |" in markdown
    assert "| speed.tokens_per_s | 1235 |" in markdown
    assert "None" not in markdown and "null" not in markdown and "mfu" not in markdown and "{" not in markdown
    assert "| pack | data/packed | `new.dir` |" in markdown and "stale" not in markdown
    assert "`c0ffee`" in markdown and "differed" not in markdown  # clean: no -dirty note
    assert not LONG_FLOAT.search(markdown) and json.dumps(latest["metrics"]) not in markdown


def test_eval_losses_reach_the_metrics_the_plot_and_the_loss_artifact(tmp_path):
    """Evaluations at steps 10, 20, 30: metrics/train.json has the last, the best and its step;
    plots/eval_loss.csv one row each; the loss artifact a rounded eval table (none without evaluations)."""
    from stages.train.telemetry import summarize

    evals = {10: 1.5000012345, 20: 1.25, 30: 1.3}
    history = [
        {**h, "straggler": 1.0, "straggler_in_order": 1.0}
        | ({"eval_loss": evals[h["step"]], "eval_label_tokens": 77} if h["step"] in evals else {})
        for h in HISTORY
    ]
    summary = summarize(history)
    assert (summary["eval_loss"], summary["best_eval_loss"], summary["best_eval_step"]) == (1.3, 1.25, 20)
    write_outputs(tmp_path, history, summary, {})
    assert (tmp_path / "plots/eval_loss.csv").read_text().splitlines() == [
        "step,eval_loss,eval_label_tokens",
        "10,1.5000012345,77",
        "20,1.25,77",
        "30,1.3,77",
    ]
    markdown = loss_markdown(tmp_path)
    assert "| 10 | 1.5 | 77 |" in markdown and "| 20 | 1.25 | 77 |" in markdown and "| 30 | 1.3 | 77 |" in markdown
    plain = [{k: v for k, v in h.items() if not k.startswith("eval")} for h in history]
    write_outputs(tmp_path, plain, summarize(plain), {})
    assert "eval_loss" not in summarize(plain) and "Eval loss" not in loss_markdown(tmp_path)


def test_generations_artifact_is_the_evaluate_stages_table(tmp_path):
    """The table keeps the four columns a person reads, in the stage's order; the description names the model, its
    step and the eval loss; a run without held-out samples says so over one empty row."""
    (tmp_path / "metrics").mkdir()
    answers = [
        {
            "sample_id": f"s{i}",
            "prompt": "<image> What?",
            "reference": "a cat",
            "generated": "a dog",
            "generated_tokens": 3,
        }
        for i in range(2)
    ]
    (tmp_path / "metrics/generations.json").write_text(json.dumps(answers))
    evaluated = {"model": "output/demo/hf", "step": 6, "eval_loss": 11.7558972}
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(evaluated))
    table, description = generations(tmp_path)
    assert [r["sample_id"] for r in table] == ["s0", "s1"] and list(table[0]) == list(GENERATION_COLUMNS)
    assert description == "output/demo/hf (step 6): eval loss 11.76, 2 held-out samples answered (greedy)"
    (tmp_path / "metrics/generations.json").write_text("[]")
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(evaluated | {"eval_loss": None, "step": None}))
    table, description = generations(tmp_path)
    assert table == [dict.fromkeys(GENERATION_COLUMNS, "")] and "no held-out samples" in description


def test_packing_artifact_shows_the_cost_balance_and_both_straggler_ratios(tmp_path):
    (tmp_path / "metrics").mkdir()
    m = {"strategy": "first_fit", "capacity": 1024, "samples": 40, "packs": 9, "efficiency": 0.871234}
    m |= {"cost_balance": True, "cost_max_over_mean": 1.01234, "straggler_world": 2}
    m |= {"straggler_ratio": 1.004321, "straggler_ratio_token_packing": 1.123456}
    (tmp_path / "metrics/pack.json").write_text(json.dumps(m))
    markdown, description = packing_markdown(tmp_path)
    assert "| straggler ratio (2 ranks; packed by tokens) |" in markdown.splitlines()[2]
    assert markdown.splitlines()[-1] == "| first_fit | 1024 | 40 | 9 | 0.8712 | on | 1.012 | 1.004 (1.123) |"
    assert description == "packing efficiency 0.8712, straggler ratio 1.004"
