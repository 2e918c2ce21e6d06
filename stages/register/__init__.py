"""The register stage: record each checkpoint of a run with its lineage in a DuckDB registry.

One row per checkpoint: id (run + step + content hash), run, step, path, metrics, the params hash, the data
hashes of every stage in dvc.lock, the git commit and the time. A checkpoint's metrics are its step's history
entry (loss, and eval_loss where that step was evaluated); the newest checkpoint's also hold metrics/train.json and,
under ``speed``, the last training process's metrics/train_speed.json (not a dependency of the stage: its wall-clock
figures differ on every run). ``hf_path`` is set on the checkpoint the export's weights are from (the newest, or
the best with load_best_model_at_end), whose metrics also hold metrics/evaluate.json under ``evaluate``.
Registering the same checkpoint again is a no-op; concurrent registrations wait for the database lock and both land.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import yaml

from schemas.errors import StageInputError
from schemas.params import Params
from stages.train.checkpoint import EXPORT_FILE, STATE_FILE, complete_checkpoints

SCHEMA = """CREATE TABLE IF NOT EXISTS checkpoints (
    id VARCHAR PRIMARY KEY, run VARCHAR, step BIGINT, path VARCHAR, hf_path VARCHAR, metrics JSON,
    params_hash VARCHAR, data_hashes JSON, git_commit VARCHAR, registered_at TIMESTAMP)"""


# Tracked files a run itself rewrites (dvc.lock, the cache: false metrics and plots) or that the registry records
# on its own (params.yaml, as the params hash; `dvc exp run -S` edits it by design): none of them makes the
# code that ran differ from the commit, so none of them marks the commit `-dirty`.
NOT_SOURCE = ("dvc.lock", "params.yaml", "metrics", "plots")


def git_commit(root: Path) -> str:
    """HEAD's commit, with `-dirty` when a tracked source file differs from it (NOT_SOURCE aside); "unknown"
    outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        excluded = [f":(exclude){path}" for path in NOT_SOURCE]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def data_hashes(root: Path) -> dict:
    """{stage: {path: md5}} for every output in dvc.lock (empty when the run did not go through DVC)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: {o["path"]: o.get("md5") for o in stage.get("outs", [])} for name, stage in stages.items()}


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.to_yaml_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _connect(path: Path, attempts: int = 200) -> duckdb.DuckDBPyConnection:
    """DuckDB allows one writing process: wait for the lock instead of failing a concurrent registration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.1)
    raise AssertionError("unreachable")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def register(params: Params, root: Path = Path(".")) -> list[dict]:
    """Register every complete checkpoint of the configured run; returns the run's rows in the registry (new and
    existing), the newest checkpoint's last."""
    args = params.trainer_args
    run_dir = root / args.output_dir / args.run_name
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise StageInputError(f"no complete checkpoint in {run_dir}: run `qvl train` first")
    metrics = _read_json(root / "metrics/train.json")
    if speed := _read_json(root / "metrics/train_speed.json"):
        metrics["speed"] = speed
    lineage = {"params_hash": params_hash(params), "data_hashes": data_hashes(root), "git_commit": git_commit(root)}
    hf = run_dir / "hf"
    exported = _read_json(hf / EXPORT_FILE).get("step", "newest") if hf.is_dir() else None
    evaluated = _read_json(root / "metrics/evaluate.json")
    rows = []
    for ckpt in checkpoints:
        state = json.loads((ckpt / STATE_FILE).read_text())
        is_export = exported == state["step"] or (exported == "newest" and ckpt == checkpoints[-1])
        step_metrics = {
            **(state["history"][-1] if state.get("history") else {}),
            **(metrics if ckpt == checkpoints[-1] else {}),
        }
        step_metrics.pop("packs", None)
        if is_export and evaluated.get("model") == str(hf.relative_to(root)):
            step_metrics["evaluate"] = evaluated
        rows.append(
            {
                "id": checkpoint_id(args.run_name, ckpt),
                "run": args.run_name,
                "step": state["step"],
                "path": str(ckpt.relative_to(root)),
                "hf_path": str(hf.relative_to(root)) if is_export else None,
                "metrics": json.dumps(step_metrics),
                **lineage,
            }
        )
    db = root / params.registry.path
    con = _connect(db)
    try:
        con.execute(SCHEMA)
        for row in rows:
            con.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [
                    row["id"],
                    row["run"],
                    row["step"],
                    row["path"],
                    row["hf_path"],
                    row["metrics"],
                    row["params_hash"],
                    json.dumps(row["data_hashes"]),
                    row["git_commit"],
                    datetime.now(UTC).replace(tzinfo=None),
                ],
            )
        registered = list_checkpoints(con, args.run_name)
    finally:
        con.close()
    newest = rows[-1]["id"]
    return [r for r in registered if r["id"] != newest] + [r for r in registered if r["id"] == newest]


def checkpoint_id(run: str, ckpt: Path) -> str:
    """``run@step-<hash of the checkpoint's trainer state>``: a retrained step gets a new id."""
    state = (ckpt / STATE_FILE).read_bytes()
    return f"{run}@{json.loads(state)['step']}-{hashlib.sha256(state).hexdigest()[:12]}"


def newest_registered(params: Params, root: Path = Path(".")) -> dict | None:
    """The registry row of the configured run's newest complete checkpoint (what the last training left), or None
    when it is not registered. Not the row of the highest step: a run that started fresh (changed config) and
    stopped at a lower step than an earlier one leaves the earlier rows in the registry."""
    args = params.trainer_args
    checkpoints = complete_checkpoints(root / args.output_dir / args.run_name)
    if not checkpoints:
        return None
    wanted = checkpoint_id(args.run_name, checkpoints[-1])
    return next((r for r in read_registry(root / params.registry.path) if r["id"] == wanted), None)


JSON_COLUMNS = ("metrics", "data_hashes")


def list_checkpoints(con: duckdb.DuckDBPyConnection, run: str | None = None) -> list[dict]:
    """Registry rows as plain values: the JSON columns (metrics, data_hashes) decoded into dicts."""
    sql = "SELECT * FROM checkpoints" + (" WHERE run = ?" if run else "") + " ORDER BY run, step"
    cursor = con.execute(sql, [run] if run else [])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    for row in rows:
        for column in JSON_COLUMNS:
            row[column] = json.loads(row[column]) if row[column] else {}
    return rows


def read_registry(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with duckdb.connect(str(path), read_only=True) as con:
        return list_checkpoints(con)
