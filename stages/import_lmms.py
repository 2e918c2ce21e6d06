"""`qvl import-lmms FILE`: convert an lmms-engine trainer config into a valid params.yaml.

Both lmms-engine layouts are read: the list form (`- type: trainer` with `config:` holding the training
arguments directly) and the dumped form (`trainer_type`, `dataset_config`, `trainer_args`, `model_config`).
Every key that cannot be carried over is reported with the reason; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.errors import ConfigError
from schemas.params import DatasetConfig, ModelConfig, Params, TrainerArgs

# lmms-engine keys with a different name here.
RENAMED = {
    "dataset_config.data_seed": "dataset_config.seed",
    "model_config.model_name_or_path": "model_config.load_from_pretrained_path",
}
# Keys whose meaning is covered another way here, with the reason given to the user.
EXPLAINED = {
    "trainer_type": "training always runs through this pipeline's FSDP2 trainer (trainer_args.fsdp2)",
    "dataset_config.dataset_format": "datasets are listed inline in dataset_config.datasets with their data_type",
    "dataset_config.dataset_path": "list the datasets inline in dataset_config.datasets",
    "dataset_config.filter_overlong_workers": "tokenize runs on all cores",
    "dataset_config.max_length": "lengths are exact after tokenize; packing_length is the cap",
    "dataset_config.object_storage": "datasets are local files (use a DVC remote for remote storage)",
    "dataset_config.bucket_name": "datasets are local files (use a DVC remote for remote storage)",
    "dataset_config.eval_dataset_path": "list eval datasets inline in dataset_config.eval_datasets, or hold out a "
    "share of the training data with dataset_config.eval_ratio",
    "dataset_config.frame_num": "kept only with video_sampling_strategy: frame_num",
    "model_config.load_from_config": "training starts from a local pretrained directory",
    "model_config.overwrite_config": "config overrides are not supported; edit the model's config.json",
    "model_config.monkey_patch_kwargs": "kernels are chosen by trainer_args.use_liger_kernel and use_rmpad",
    "model_config.torch_dtype": "the dtype follows trainer_args.bf16",
    "model_config.model_type": "the family comes from dataset_config.processor_config.processor_type",
    "trainer_args.reduce_dtype": "gradients are reduced in fp32 under bf16 mixed precision",
    "trainer_args.output_dtype": "the Hugging Face export keeps the training dtype",
    "trainer_args.metric_for_best_model": "load_best_model_at_end keeps the checkpoint of the lowest eval_loss",
    "trainer_args.greater_is_better": "load_best_model_at_end keeps the checkpoint of the lowest eval_loss",
}
HF_ONLY = "a Hugging Face Trainer argument with no equivalent in this pipeline"


@dataclass
class ImportReport:
    params: dict[str, Any]
    unmapped: dict[str, str] = field(default_factory=dict)  # dotted key -> reason
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        hf = sorted(k for k, why in self.unmapped.items() if why == HF_ONLY)
        out = [f"  {k}: {why}" for k, why in sorted(self.unmapped.items()) if why != HF_ONLY]
        if hf:
            out.append(f"  {len(hf)} key(s), {HF_ONLY}: {', '.join(k.split('.')[-1] for k in hf)}")
        return out + [f"  note: {n}" for n in self.notes]


def _trainer_config(doc: Any, source: str) -> dict[str, Any]:
    if isinstance(doc, list):
        trainers = [item.get("config") for item in doc if isinstance(item, dict) and item.get("type") == "trainer"]
        if not trainers or not isinstance(trainers[0], dict):
            raise ConfigError(f"{source}: no `- type: trainer` entry with a `config:` mapping")
        return trainers[0]
    if isinstance(doc, dict) and ("trainer_args" in doc or "dataset_config" in doc):
        return doc
    raise ConfigError(f"{source}: not an lmms-engine trainer config (expected `- type: trainer` or trainer_args)")


def _split_sections(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """dataset_config / model_config / trainer_args, whichever layout the file uses."""
    trainer = dict(cfg.get("trainer_args") or {})
    extras = {
        k: v
        for k, v in cfg.items()
        if k not in ("dataset_config", "model_config", "trainer_args", "trainer_type", "extra_kwargs")
    }
    trainer.update(extras)  # list form: the training arguments sit next to the sections
    return {
        "dataset_config": dict(cfg.get("dataset_config") or {}),
        "model_config": dict(cfg.get("model_config") or {}),
        "trainer_args": trainer,
    }


def _map_dataset(src: dict[str, Any], report: ImportReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = set(DatasetConfig.model_fields)
    for key, value in src.items():
        dotted = f"dataset_config.{key}"
        if key == "extra_kwargs":
            for k, v in (value or {}).items():
                target = k if k in fields else None
                if target:
                    out[target] = v
                else:
                    report.unmapped[f"{dotted}.{k}"] = "no such dataset option here"
        elif key == "processor_config":
            out[key] = {k: v for k, v in (value or {}).items() if k in ("processor_name", "processor_type")}
            for k in set(value or {}) - {"processor_name", "processor_type"}:
                report.unmapped[f"{dotted}.{k}"] = "set pixel budgets with dataset_config.image_*/video_* keys"
        elif key == "datasets":
            if value:
                out[key] = [{k: d[k] for k in ("path", "data_folder", "data_type") if k in d} for d in value]
        elif dotted in RENAMED:
            out[RENAMED[dotted].split(".", 1)[1]] = value
        elif key in fields:
            if value is not None:
                out[key] = value
        else:
            report.unmapped[dotted] = EXPLAINED.get(dotted, "no such dataset option here")
    return out


def _map_flat(
    section: str, src: dict[str, Any], fields: set[str], report: ImportReport, default_reason: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in src.items():
        dotted = f"{section}.{key}"
        if dotted in RENAMED:
            out[RENAMED[dotted].split(".", 1)[1]] = value
        elif key in fields and value is not None:
            out[key] = value
        elif key not in fields:
            report.unmapped[dotted] = EXPLAINED.get(dotted, default_reason)
    return out


def _map_trainer(src: dict[str, Any], report: ImportReport) -> dict[str, Any]:
    out = _map_flat("trainer_args", src, set(TrainerArgs.model_fields), report, HF_ONLY)
    if isinstance(out.get("fsdp_config"), dict):
        fsdp = out["fsdp_config"]
        keep = {k: fsdp[k] for k in ("transformer_layer_cls_to_wrap", "reshard_after_forward") if k in fsdp}
        for k in set(fsdp) - set(keep):
            report.unmapped[f"trainer_args.fsdp_config.{k}"] = "FSDP2 wrapping is per layer class here"
        out["fsdp_config"] = keep
    report_to = out.get("report_to")
    if report_to is not None:
        names = [report_to] if isinstance(report_to, str) else list(report_to)
        out["report_to"] = [n for n in names if n in ("tensorboard", "wandb", "none")] or ["none"]
        for n in set(names) - set(out["report_to"]):
            report.unmapped[f"trainer_args.report_to.{n}"] = "supported: tensorboard, wandb, none"
    return out


def _drop_invalid(params: dict[str, Any], report: ImportReport) -> Params:
    """Validate; a value this pipeline does not accept is removed (default kept) and reported.

    Inside a list (e.g. one dataset entry with data_type arrow) the whole list element is removed. Values of one
    section that contradict each other (e.g. load_best_model_at_end without an eval at every save) are an error.
    """
    for _ in range(100):
        try:
            return Params.model_validate(params)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc, node = err["loc"], params
            for depth, part in enumerate(loc):
                child = node[part] if isinstance(node, (dict, list)) else None
                if isinstance(part, int) or depth == len(loc) - 1:
                    where = ".".join(map(str, loc[: depth + 1]))
                    if not isinstance(part, int) and isinstance(child, dict):  # contradicting values: none to drop
                        raise ConfigError(f"cannot convert the config: {where}: {err['msg']}") from None
                    bad = node.pop(part)
                    report.unmapped[where] = f"value {bad!r} removed: {err['msg']}"
                    break
                node = child
    raise ConfigError("cannot convert the config: validation did not converge")


def _infer_family(params: dict[str, Any], report: ImportReport) -> None:
    """lmms-engine examples sometimes carry a placeholder processor_type; infer it from the model's names."""
    proc = params["dataset_config"].setdefault("processor_config", {})
    if proc.get("processor_type") in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return
    hints = " ".join(
        [
            str(proc.get("processor_name", "")),
            str(params["model_config"].get("load_from_pretrained_path", "")),
            *map(str, params["trainer_args"].get("fsdp_config", {}).get("transformer_layer_cls_to_wrap") or []),
        ]
    )
    hints = hints.lower().replace(".", "_").replace("-", "_")
    guess = next(
        (
            f
            for key, f in (
                ("qwen3vlmoe", "qwen3_vl_moe"),
                ("qwen3_vl_moe", "qwen3_vl_moe"),
                ("qwen3vl", "qwen3_vl"),
                ("qwen3_vl", "qwen3_vl"),
                ("qwen2_5", "qwen2_5_vl"),
                ("qwen2vl", "qwen2_vl"),
                ("qwen2_vl", "qwen2_vl"),
            )
            if key in hints
        ),
        None,
    )
    if guess:
        report.unmapped["dataset_config.processor_config.processor_type"] = (
            f"{proc.get('processor_type')!r} is not a Qwen-VL family; inferred {guess!r} from the model names"
        )
        proc["processor_type"] = guess


def import_lmms(path: str | Path) -> ImportReport:
    """Read an lmms-engine YAML and return the params mapping plus what could not be mapped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"lmms-engine config not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    cfg = _trainer_config(doc, str(path))
    report = ImportReport(params={})
    if cfg.get("trainer_type") not in (None, "fsdp2_trainer"):
        report.unmapped["trainer_type"] = f"{cfg['trainer_type']!r}: {EXPLAINED['trainer_type']}"
    for key in ("extra_kwargs",):
        if cfg.get(key):
            report.unmapped[key] = "lmms-engine plugin arguments have no equivalent here"
    sections = _split_sections(cfg)
    params = {
        "dataset_config": _map_dataset(sections["dataset_config"], report),
        "model_config": _map_flat(
            "model_config", sections["model_config"], set(ModelConfig.model_fields), report, "no such model option here"
        ),
        "trainer_args": _map_trainer(sections["trainer_args"], report),
    }
    _infer_family(params, report)
    for section in ("dataset_config", "model_config"):
        for key in ("processor_name", "load_from_pretrained_path"):
            value = params[section].get("processor_config", {}) if key == "processor_name" else params[section]
            name = value.get(key) if isinstance(value, dict) else None
            if (
                section == ("dataset_config" if key == "processor_name" else "model_config")
                and name
                and not Path(name).exists()
                and name.count("/") == 1
                and not name.startswith((".", "/"))
            ):
                report.notes.append(
                    f"{key} {name!r} looks like a hub id: nothing is downloaded here, "
                    "point it at a local copy of the model"
                )
    report.params = _drop_invalid(params, report).to_yaml_dict()
    return report


def write_params(report: ImportReport, out: Path) -> None:
    from stages.io import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(yaml.safe_dump(report.params, sort_keys=False), encoding="utf-8")
