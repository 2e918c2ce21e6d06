"""The Prefect artifacts the pipeline publishes, built from the stages' metrics files and the registry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stages.register import read_registry


def validation_table(root: Path) -> None:
    m = json.loads((root / "metrics/validate.json").read_text())
    rows = [{"outcome": "accepted", "rows": m["accepted"]}]
    rows += [{"outcome": f"rejected: {k}", "rows": v} for k, v in sorted(m["by_reason"].items(), key=lambda kv: -kv[1])]
    create_table_artifact(
        key="validation-counts",
        table=rows,
        description=f"validate: {m['input']} rows, {m['accepted']} accepted, {m['rejected']} rejected",
    )


def packing_summary(root: Path) -> None:
    m = json.loads((root / "metrics/pack.json").read_text())
    create_markdown_artifact(
        key="packing-efficiency",
        markdown=(
            f"## Packing\n\n| strategy | capacity | samples | packs | efficiency |\n|---|---|---|---|---|\n"
            f"| {m['strategy']} | {m['capacity']} | {m['samples']} | {m['packs']} | {m['efficiency']:.4f} |\n"
        ),
        description=f"packing efficiency {m['efficiency']:.4f}",
    )


def loss_curve(root: Path) -> None:
    with open(root / "plots/train_loss.csv") as f:
        rows = [
            {
                "step": int(r["step"]),
                "loss": round(float(r["loss"]), 6),
                "lr": float(r["lr"]),
                "tokens": int(r["tokens"]),
            }
            for r in csv.DictReader(f)
        ]
    create_table_artifact(key="loss-curve", table=rows, description="training loss by step")


def registered_checkpoint(root: Path, registry_path: str) -> dict:
    rows = read_registry(root / registry_path)
    latest = rows[-1]
    hashes = latest["data_hashes"]
    lineage = "\n".join(
        f"| {stage} | {path} | `{md5}` |" for stage, outs in hashes.items() for path, md5 in outs.items()
    )
    create_markdown_artifact(
        key="registered-checkpoint",
        markdown=(
            f"## Checkpoint `{latest['id']}`\n\n- run: {latest['run']}, step {latest['step']}\n- path: "
            f"`{latest['path']}`, Hugging Face export: `{latest['hf_path']}`\n"
            f"- params hash: `{latest['params_hash']}`\n"
            f"- git commit: `{latest['git_commit']}`\n- metrics: `{json.dumps(latest['metrics'])}`\n\n"
            f"| stage | output | md5 |\n|---|---|---|\n{lineage}\n"
        ),
        description=f"registered {latest['id']}",
    )
    return latest
