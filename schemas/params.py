"""The pydantic model of params.yaml: one config for every stage, in lmms-engine's vocabulary.

Unknown keys are errors that name the key and the nearest valid one (lmms-engine drops them silently).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import ConfigError


class Section(BaseModel):
    """Base of every params.yaml section: no unknown keys, no coercion surprises."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetEntry(Section):
    path: str
    data_folder: str = ""
    data_type: Literal["json", "jsonl", "parquet"] = "jsonl"


class ProcessorConfig(Section):
    processor_name: str = "models/tiny-qwen2_5_vl"
    processor_type: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"] = "qwen2_5_vl"


class DatasetConfig(Section):
    dataset_type: str = "vision"
    datasets: list[DatasetEntry] = Field(default_factory=list)
    processor_config: ProcessorConfig = Field(default_factory=ProcessorConfig)
    shuffle: bool = True
    seed: int = 42
    packing: bool = True
    packing_strategy: Literal["first_fit", "first_fit_decreasing", "best_fit_decreasing"] = "first_fit"
    packing_length: int = Field(16384, gt=0)
    # Swap samples between packs until their estimated FLOPs agree (stages/pack/cost_balance.py), so one pack a
    # rank a step does not wait for the heaviest; None: on with first_fit, off with the decreasing strategies
    # (their packs are too full to exchange samples).
    packing_cost_balance: bool | None = None
    filter_overlong: bool = True
    # Pixel budgets; None means qwen-vl-utils' default for the family (token counts x factor^2).
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video_backend: Literal["qwen_vl_utils"] = "qwen_vl_utils"
    video_sampling_strategy: Literal["fps", "frame_num"] = "fps"
    fps: float = Field(2.0, gt=0)
    frame_num: int | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_total_pixels: int | None = None
    # Held-out data: eval_datasets (listed like datasets) and/or eval_ratio, the share of the training datasets'
    # samples held out, chosen by a hash of each sample's id (the same split on every run and machine, whatever
    # the seed). Validate marks each accepted sample's split; pack packs the eval samples apart.
    eval_datasets: list[DatasetEntry] = Field(default_factory=list)
    eval_ratio: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _a_file_is_train_or_eval(self) -> DatasetConfig:
        both = sorted({d.path for d in self.datasets} & {d.path for d in self.eval_datasets})
        if both:
            raise ValueError(f"{', '.join(both)} listed in both datasets and eval_datasets: a file is one or the other")
        return self

    @model_validator(mode="after")
    def _cost_balance_needs_room(self) -> DatasetConfig:
        if self.packing and self.packing_cost_balance and self.packing_strategy != "first_fit":
            raise ValueError(
                f"packing_cost_balance needs packing_strategy first_fit: {self.packing_strategy} fills each pack "
                "with samples of similar length to within a few tokens, so no exchange between packs fits (on the "
                "GPU benchmark's data the straggler ratio stays 1.11 against 1.000 with first_fit)"
            )
        return self

    @property
    def balances_cost(self) -> bool:
        """Whether pack balances the packs' estimated FLOPs (packing on, and packing_cost_balance or its default)."""
        on = self.packing_strategy == "first_fit" if self.packing_cost_balance is None else self.packing_cost_balance
        return self.packing and on

    def all_datasets(self) -> list[tuple[DatasetEntry, str]]:
        """Every dataset file with its split ("train" or "eval"), training datasets first."""
        return [(d, "train") for d in self.datasets] + [(d, "eval") for d in self.eval_datasets]


class ModelConfig(Section):
    load_from_pretrained_path: str = "models/tiny-qwen2_5_vl"
    attn_implementation: str = "auto"
    # Mixture-of-experts models (Qwen3-VL-MoE): the weight of the router load-balancing loss added to the loss;
    # None: the checkpoint config's router_aux_loss_coef; 0: off. Ignored by dense models.
    router_aux_loss_coef: float | None = Field(None, ge=0)


class FsdpConfig(Section):
    transformer_layer_cls_to_wrap: list[str] | None = None
    reshard_after_forward: bool = True


class TrainerArgs(Section):
    output_dir: str = "output"
    run_name: str = "demo"
    seed: int = 42
    per_device_train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    vision_tower_lr: float | None = None
    mm_projector_lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_steps: int = -1
    num_train_epochs: float = 1.0
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = 0
    # Held-out loss during training (HF meaning): "steps" every eval_steps steps (default: logging_steps), "epoch"
    # at each epoch's end; either way also at the last step. Needs eval data (dataset_config.eval_ratio or
    # eval_datasets).
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = Field(None, ge=1)
    # Keep the checkpoint with the lowest eval loss (never rotated out by save_total_limit) and export it instead
    # of the last step's weights (HF's load_best_model_at_end with metric eval_loss). Needs every save to be an
    # evaluation: eval_strategy steps with save_steps a multiple of eval_steps.
    load_best_model_at_end: bool = False
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = 2
    logging_steps: int = 1
    bf16: bool = True
    gradient_checkpointing: bool = True
    freeze_modules: list[str] = Field(default_factory=list)
    use_liger_kernel: bool = False
    use_rmpad: bool = True
    fsdp2: bool = True
    fsdp_config: FsdpConfig = Field(default_factory=FsdpConfig)
    sp_ulysses_degree: int = Field(1, ge=1)
    dataloader_num_workers: int = 1
    balance_packs: bool = True  # spread each step's packs over the data-parallel ranks by estimated FLOPs
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(default_factory=lambda: ["none"])
    nproc_per_node: int | None = None
    nnodes: int = 1

    @model_validator(mode="before")
    @classmethod
    def _report_to_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            data = {**data, "report_to": [data["report_to"]]}
        return data

    @model_validator(mode="after")
    def _best_needs_an_eval_at_every_save(self) -> TrainerArgs:
        if not self.load_best_model_at_end:
            return self
        every = self.eval_steps or self.logging_steps
        if self.eval_strategy != "steps" or self.save_steps % every:
            raise ValueError(
                "load_best_model_at_end needs an eval loss at every checkpoint: set eval_strategy: steps and "
                f"save_steps a multiple of eval_steps (now eval_strategy {self.eval_strategy!r}, eval_steps {every}, "
                f"save_steps {self.save_steps})"
            )
        return self


class ValidateConfig(Section):
    allow_remote_media: bool = False
    max_aspect_ratio: float = 200.0
    # Smallest image side; None means the family's resize factor (28 for Qwen2/2.5-VL, 32 for Qwen3-VL),
    # below which transformers' smart_resize refuses the image.
    min_image_side: int | None = None
    media_cache: str = ".cache/qvl/media.duckdb"
    workers: int = 0  # 0: one per CPU this process may use (affinity and cgroup quota, stages/cpus.py)
    # DuckDB's memory limit for the stage's queries (spilling to .cache/duckdb-tmp above it); any DuckDB size.
    memory_limit: str = Field("4GB", pattern=r"(?i)^\d+(\.\d+)?\s*([KMGT]i?B|B)$")


class DecodeConfig(Section):
    workers: int = 0  # 0: one per CPU this process may use
    shard_target_mb: int = 256
    # exact: torchvision's bicubic + antialias in Python, the pixels qwen-vl-utils gives; fast: ffmpeg's bicubic
    # scaler in its filter graph (close, not equal: the stage's metrics report the measured difference)
    resize: Literal["exact", "fast"] = "exact"


class EvaluateConfig(Section):
    """The evaluate stage: the eval loss of a trained model over the held-out packs, and a few generations."""

    # The model to evaluate: None is the run's export (<output_dir>/<run_name>/hf); or a from_pretrained
    # directory, or a checkpoint-<step> directory of the run (its sharded weights over the base model)
    checkpoint: str | None = None
    generations: int = Field(4, ge=0)  # held-out samples the model answers (greedy), shown beside the reference
    max_new_tokens: int = Field(64, ge=1)


class RegistryConfig(Section):
    path: str = "registry/registry.duckdb"


class OrchestrationConfig(Section):
    """How the flow runs the stages; nothing here changes a stage's outputs, so no DVC stage depends on it."""

    # "flow/deployment" on the GPU work pool that trains (flows/gpu.py); None: train in the flow's own process.
    gpu_deployment: str | None = None
    # The DVC remote (a name from `dvc remote list`) the GPU dispatch pushes to and pulls from; None: the default.
    dvc_remote: str | None = None
    # Where decode and tokenize run their chunks: a local process pool, or Dask through Prefect's DaskTaskRunner.
    task_runner: Literal["local", "dask"] = "local"
    # An existing Dask scheduler (tcp://host:port); None with task_runner dask: a temporary local cluster.
    dask_address: str | None = None

    @field_validator("gpu_deployment")
    @classmethod
    def _flow_slash_deployment(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", v):
            raise ValueError("expected FLOW/DEPLOYMENT, e.g. train_on_gpu/train-gpu")
        return v

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"((tcp|tls)://)?[\w.\-\[\]:]+:\d+", v):
            raise ValueError("expected a Dask scheduler address, e.g. tcp://10.0.0.5:8786")
        return v

    @model_validator(mode="after")
    def _address_needs_dask(self) -> OrchestrationConfig:
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is set but task_runner is 'local'; set task_runner: dask to use it")
        return self


class Params(Section):
    dataset_config: DatasetConfig = Field(default_factory=DatasetConfig)
    model_config_: ModelConfig = Field(default_factory=ModelConfig, alias="model_config")
    trainer_args: TrainerArgs = Field(default_factory=TrainerArgs)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for suggesting the nearest valid key)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"unknown key {dotted!r}{hint}"
    return f"{dotted}: {error['msg']} (got {error.get('input')!r})"


def parse_params(data: dict[str, Any], origin: str = "params") -> Params:
    """Validate a params mapping; every problem is listed in one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{origin} is invalid:\n  {problems}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(data, str(path))
