"""The Prefect artifacts the pipeline publishes, built from the stages' metrics files and the registry."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from schemas.errors import PipelineError
from schemas.params import Params
from stages.register import data_hashes, newest_registered
from stages.train.plot import fmt_loss, fmt_lr


def validation_table(root: Path) -> None:
    m = json.loads((root / "metrics/validate.json").read_text())
    by_reason = json.loads((root / "metrics/validate_rejects.json").read_text())
    rows = [{"outcome": "accepted", "rows": m["accepted"]}]
    rows += [{"outcome": f"rejected: {k}", "rows": v} for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])]
    create_table_artifact(
        key="validation-counts",
        table=rows,
        description=f"validate: {m['input']} rows, {m['accepted']} accepted, {m['rejected']} rejected",
    )


def packing_markdown(root: Path) -> tuple[str, str]:
    """(markdown, description) of metrics/pack.json: efficiency, cost balance and the straggler ratio."""
    m = json.loads((root / "metrics/pack.json").read_text())
    markdown = (
        "## Packing\n\n| strategy | capacity | samples | packs | efficiency | cost balance | dearest pack / mean "
        f"| straggler ratio ({m['straggler_world']} ranks; packed by tokens) |\n|---|---|---|---|---|---|---|---|\n"
        f"| {m['strategy']} | {m['capacity']} | {m['samples']} | {m['packs']} | {m['efficiency']:.4f} "
        f"| {'on' if m['cost_balance'] else 'off'} | {m['cost_max_over_mean']:.3f} "
        f"| {m['straggler_ratio']:.3f} ({m['straggler_ratio_token_packing']:.3f}) |\n"
    )
    return markdown, f"packing efficiency {m['efficiency']:.4f}, straggler ratio {m['straggler_ratio']:.3f}"


def packing_summary(root: Path) -> None:
    markdown, description = packing_markdown(root)
    create_markdown_artifact(key="packing-efficiency", markdown=markdown, description=description)


MAX_TABLE_ROWS = 20


def _sampled(rows: list[dict], n: int = MAX_TABLE_ROWS) -> list[dict]:
    """At most ``n`` rows, evenly spaced, the first and last included."""
    if len(rows) <= n:
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]


def loss_markdown(root: Path) -> str:
    """The loss chart (plots/train_loss.svg, written by the train stage, inlined as a data URI: the Prefect UI
    renders a markdown image) and the steps as a table: loss to 4 significant digits, lr as 1.00e-04."""
    with open(root / "plots/train_loss.csv") as f:
        history = list(csv.DictReader(f))
    svg = (root / "plots/train_loss.svg").read_text()
    image = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    table = "\n".join(
        f"| {r['step']} | {fmt_loss(float(r['loss']))} | {fmt_lr(float(r['lr']))} | {r['tokens']} |"
        for r in _sampled(history)
    )
    shown = "" if len(history) <= MAX_TABLE_ROWS else f" ({MAX_TABLE_ROWS} of {len(history)} steps)"
    return (
        f"## Training loss\n\n![training loss and learning rate by step]({image})\n\n"
        f"| step | loss | lr | tokens |\n|---:|---:|---:|---:|\n{table}\n\n"
        f"plots/train_loss.csv{shown}; the chart is plots/train_loss.svg\n" + eval_markdown(root)
    )


def eval_markdown(root: Path) -> str:
    """The held-out loss at each evaluation (plots/eval_loss.csv), or nothing when the run did not evaluate."""
    path = root / "plots/eval_loss.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    if not rows:
        return ""
    table = "\n".join(
        f"| {r['step']} | {fmt_loss(float(r['eval_loss']))} | {r['eval_label_tokens']} |" for r in _sampled(rows)
    )
    return (
        f"\n## Eval loss (held-out packs)\n\n| step | eval loss | label tokens |\n|---:|---:|---:|\n{table}\n\n"
        "plots/eval_loss.csv\n"
    )


def loss_curve(root: Path) -> None:
    with open(root / "metrics/train.json") as f:
        final = json.load(f)
    create_markdown_artifact(
        key="loss-curve",
        markdown=loss_markdown(root),
        description=f"training loss {fmt_loss(final['final_loss'])} after {final['steps']} steps"
        + (f", eval loss {fmt_loss(final['eval_loss'])}" if "eval_loss" in final else ""),
    )


GENERATION_COLUMNS = ("sample_id", "prompt", "reference", "generated")


def generations(root: Path) -> tuple[list[dict], str]:
    """The evaluate stage's answers on held-out samples beside the references (metrics/generations.json), as table
    rows (one empty row when there are none: Prefect shows no table without rows), and the table's description."""
    evaluated = json.loads((root / "metrics/evaluate.json").read_text())
    rows = json.loads((root / "metrics/generations.json").read_text())
    loss = evaluated["eval_loss"]
    step = "" if evaluated["step"] is None else f" (step {evaluated['step']})"
    description = (
        f"{evaluated['model']}{step}: "
        + ("no held-out samples" if loss is None else f"eval loss {fmt_loss(loss)}")
        + f", {len(rows)} held-out samples answered (greedy)"
    )
    table = [{c: r[c] for c in GENERATION_COLUMNS} for r in rows] or [dict.fromkeys(GENERATION_COLUMNS, "")]
    return table, description


def generations_table(root: Path) -> None:
    table, description = generations(root)
    create_table_artifact(key="eval-generations", table=table, description=description)


def _metric_rows(metrics: dict, prefix: str = "") -> list[str]:
    """Markdown table rows for a registry metrics dict: nested dicts flattened (speed.tokens_per_s), nulls and
    long texts left out, floats to 4 significant digits, learning rates as 1.00e-04."""
    rows = []
    for key, value in metrics.items():
        name = prefix + key
        if isinstance(value, dict):
            rows += _metric_rows(value, f"{name}.")
        elif value is None or (isinstance(value, str) and len(value) > 40):
            continue
        elif isinstance(value, float):
            rows.append(f"| {name} | {fmt_lr(value) if key == 'lr' else fmt_loss(value)} |")
        else:
            rows.append(f"| {name} | {value} |")
    return rows


def checkpoint_markdown(root: Path, latest: dict) -> str:
    """The registered checkpoint: what it is, its metrics as a table, the code that ran, and this run's lineage
    (the output hashes in dvc.lock as it stands after register, i.e. what this run produced or reused)."""
    lineage = "\n".join(
        f"| {stage} | {path} | `{md5}` |" for stage, outs in data_hashes(root).items() for path, md5 in outs.items()
    )
    metrics = "\n".join(_metric_rows(latest["metrics"]))
    export = f"`{latest['hf_path']}`" if latest["hf_path"] else "another checkpoint's (load_best_model_at_end)"
    dirty = " (tracked source files differed from this commit)" if latest["git_commit"].endswith("-dirty") else ""
    return (
        f"## Checkpoint `{latest['id']}`\n\n- run: {latest['run']}, step {latest['step']}\n- path: "
        f"`{latest['path']}`, Hugging Face export: {export}\n"
        f"- params hash: `{latest['params_hash']}`\n"
        f"- git commit of the code that ran: `{latest['git_commit']}`{dirty}\n\n"
        f"### Metrics\n\n| metric | value |\n|---|---:|\n{metrics}\n\n"
        f"### Lineage (dvc.lock after this run)\n\n| stage | output | md5 |\n|---|---|---|\n{lineage}\n"
    )


def registered_checkpoint(root: Path, params: Params) -> dict:
    """The artifact of the checkpoint the last training left (registered by the register stage just before)."""
    latest = newest_registered(params, root)
    if latest is None:
        raise PipelineError("register finished but the newest checkpoint is not in the registry")
    create_markdown_artifact(
        key="registered-checkpoint",
        markdown=checkpoint_markdown(root, latest),
        description=f"registered {latest['id']}",
    )
    return latest
