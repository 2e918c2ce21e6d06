"""Packs -> padding-free training rows, and the stateful loader that gives each rank its packs.

A pack becomes one row: the samples' input_ids concatenated; targets shifted inside each sample (so no label
crosses a sample boundary); position_ids (4, 1, L): row 0 restarts at 0 for each sample (transformers builds a
block-diagonal causal mask from it), rows 1-3 are the M-RoPE positions the model's own get_rope_index gives for
each sample alone; pixels from the processor's image and video processors (videos from the frame shards).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from schemas.params import DatasetConfig
from stages.decode.shards import FrameStore
from stages.families import ModelFamily
from stages.tokenize.vision import VisionArgs
from stages.train.balance import Assignment, balanced, in_order, straggler_ratio
from stages.train.samples import PACKS, TOKENIZED_ARROW, Packs, TokenizedSamples

IGNORE = -100
END_OF_SAMPLE = np.array([IGNORE], np.int32)  # the target of a sample's last token


@dataclass
class Row:
    """One padding-free micro-batch row (batch dimension 1)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    label_tokens: int
    pack_ids: list[int]
    vision: dict = field(default_factory=dict)  # pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
    is_dummy: bool = False  # an idle rank's label-free copy of a pack
    sample_tokens: int = 0  # the first tokens, those of real samples (the dummy vision segments follow them)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def pin_memory(self) -> Row:
        """Page-locked copies, so the copies to the GPU run asynchronously (DataLoader calls this with pin)."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            targets=self.targets.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            vision={k: v.pin_memory() for k, v in self.vision.items()},
        )

    def seq_lengths(self) -> list[int]:
        starts = (self.position_ids[0, 0] == 0).nonzero().flatten().tolist() + [self.tokens]
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]


class RowBuilder:
    """Builds rows from pack ids; holds the tokenized samples (memory-mapped, see samples.py), the packs' row
    numbers, the frame store and a meta-device rope model."""

    def __init__(self, root: Path, processor, vision: VisionArgs, model_class: type, config):
        self.root = root
        self.processor = processor
        self.vision = vision
        self.samples = TokenizedSamples(root / TOKENIZED_ARROW)
        self.packs = Packs(root / PACKS, self.samples)
        frames = root / "data/frames"
        self.frames = FrameStore(frames) if (frames / "index.parquet").exists() else None
        with torch.device("meta"):  # get_rope_index reads only the config: no weights needed
            self.rope_model = model_class._from_config(config).model
        self.image_token = config.image_token_id
        self.video_token = config.video_token_id
        self.dummies = {kind: self._dummy(kind) for kind in ("image", "video")}

    @classmethod
    def for_family(cls, root: Path, processor, cfg: DatasetConfig, fam: ModelFamily, config) -> RowBuilder:
        """The builder for ``fam``'s model class, with the pixel budget ``cfg`` sets on ``processor``."""
        vision = VisionArgs.for_processor(processor, cfg)
        return cls(root, processor, vision, fam.transformers_class(fam.model_class), config)

    def for_packs(self, path: Path) -> RowBuilder:
        """This builder over another pack table of the same tokenized samples (the eval packs)."""
        other = copy.copy(self)
        other.packs = Packs(path, self.samples)
        return other

    def _dummy(self, kind: str) -> dict:
        """A tiny label-free image or video segment. FSDP2 needs every rank to run the vision tower the same
        number of times per step (once for images, once for videos), so a row without images or videos gets
        one of these; being its own packed segment with no labels, it changes no real token's output or loss."""
        from transformers.video_utils import VideoMetadata

        side = self.vision.patch_size * self.vision.merge_size
        text = self.processor.apply_chat_template([{"role": "user", "content": [{"type": kind}]}], tokenize=False)
        if kind == "image":
            out = self.processor(
                text=[text],
                images=[np.zeros((side, side, 3), np.uint8)],
                return_tensors="pt",
                images_kwargs=self.vision.images_kwargs(),
            )
            vision = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            sample = {"image_grid_thw": out["image_grid_thw"].tolist(), "video_grid_thw": [], "second_per_grid_ts": []}
        else:
            frames = np.zeros((self.vision.temporal_patch_size, side, side, 3), np.uint8)
            meta = VideoMetadata(total_num_frames=len(frames), fps=2.0, frames_indices=list(range(len(frames))))
            out = self.processor(
                text=[text],
                videos=[frames],
                return_tensors="pt",
                videos_kwargs={"do_resize": False, "do_sample_frames": False, "video_metadata": [meta]},
            )
            vision = {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}
            seconds = out.get("second_per_grid_ts", [])
            sample = {
                "image_grid_thw": [],
                "video_grid_thw": out["video_grid_thw"].tolist(),
                "second_per_grid_ts": list(map(float, seconds)),
            }
        ids = out["input_ids"]
        positions = torch.cat([torch.arange(ids.shape[1]).view(1, 1, -1), self._rope(sample, ids)], dim=0)
        return {"ids": ids, "positions": positions, "vision": vision}

    def _rope(self, sample: dict, ids: torch.Tensor) -> torch.Tensor:
        if not sample["image_grid_thw"] and not sample["video_grid_thw"]:
            return torch.arange(ids.shape[1]).expand(3, 1, -1)
        mm_types = (ids == self.image_token).int() + 2 * (ids == self.video_token).int()
        grids = {
            k: torch.tensor(sample[k], dtype=torch.long) if sample[k] else None
            for k in ("image_grid_thw", "video_grid_thw")
        }
        seconds = torch.tensor(sample["second_per_grid_ts"]) if sample["second_per_grid_ts"] else None
        positions, _ = self.rope_model.get_rope_index(
            ids, mm_types, grids["image_grid_thw"], grids["video_grid_thw"], second_per_grid_ts=seconds
        )
        return positions

    def build(self, pack_ids: list[int], dummy: bool = False) -> Row:
        """Concatenate the packs' samples into one row; ``dummy`` rows carry no labels (idle ranks)."""
        rows = np.concatenate([self.packs.rows(p) for p in pack_ids] + [np.zeros(0, np.int64)])
        return self._build_rows(rows, list(pack_ids), dummy)

    def build_samples(self, sample_ids: list[str], pack_ids: list[int] | None = None, dummy: bool = False) -> Row:
        """One row of the given samples, in order (``build`` for whole packs; tests and benchmarks for others)."""
        return self._build_rows(self.samples.rows_of(sample_ids), pack_ids or [], dummy)

    def vision_inputs(self, media: list[dict], names: Callable[[], list[str]] = list) -> dict:
        """The image and video processors' tensors for the samples whose media rows (``samples.media``) are given,
        checked against the tokenized grids; no dummy segment (``names``: the samples' ids, for the error)."""
        images = [Image.open(self.root / p).convert("RGB") for s in media for p in s["image_paths"]]
        videos = [self.frames.get(k) for s in media for k in s["video_keys"]]
        vision = {}
        if images:
            out = self.processor.image_processor(images=images, return_tensors="pt", **self.vision.images_kwargs())
            vision["pixel_values"], vision["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
            if out["image_grid_thw"].tolist() != [g for s in media for g in s["image_grid_thw"]]:
                raise ValueError(f"samples {names()}: image grids differ from the tokenized data; re-run tokenize")
        if videos:
            kwargs = self.vision.videos_kwargs(videos)
            out = self.processor.video_processor(videos=[v.frames for v in videos], return_tensors="pt", **kwargs)
            vision["pixel_values_videos"], vision["video_grid_thw"] = out["pixel_values_videos"], out["video_grid_thw"]
            if out["video_grid_thw"].tolist() != [g for s in media for g in s["video_grid_thw"]]:
                raise ValueError(f"samples {names()}: video grids differ from the tokenized data; re-run tokenize")
        return vision

    def _build_rows(self, rows: np.ndarray, pack_ids: list[int], dummy: bool) -> Row:
        """One row of the tokenized rows ``rows``, in order; only these rows are read from the mapped file."""
        ids_parts, target_parts, pos_parts, media = [], [], [], []
        for r in rows.tolist():
            s = self.samples.media(r)
            input_ids, labels = self.samples.tokens(r)  # int32 views of the mapped file
            ids_parts.append(input_ids)
            target_parts += [labels[1:], END_OF_SAMPLE]  # targets shifted inside the sample: none crosses into the next
            if s["image_grid_thw"] or s["video_grid_thw"]:
                ids = torch.from_numpy(input_ids.astype(np.int64)).view(1, -1)
                pos_parts.append(torch.cat([torch.arange(ids.shape[1]).view(1, 1, -1), self._rope(s, ids)], dim=0))
            else:  # text: the text position and the three M-RoPE rows are all 0..n-1
                pos_parts.append(torch.arange(len(input_ids)).expand(4, 1, -1))
            media.append(s)
        vision = self.vision_inputs(media, lambda: self.samples.ids(rows))
        sample_tokens = sum(len(p) for p in ids_parts)
        for kind in ("image", "video"):
            if f"{kind}_grid_thw" not in vision:
                segment = self.dummies[kind]
                ids_parts.append(segment["ids"][0].numpy())
                target_parts.append(np.full(segment["ids"].shape[1], IGNORE))
                pos_parts.append(segment["positions"])
                vision.update(segment["vision"])
        targets = torch.from_numpy(np.concatenate(target_parts).astype(np.int64)).view(1, -1)
        if dummy:
            targets.fill_(IGNORE)
        return Row(
            torch.from_numpy(np.concatenate(ids_parts).astype(np.int64)).view(1, -1),
            targets,
            torch.cat(pos_parts, dim=2),
            int((targets != IGNORE).sum()),
            list(pack_ids),
            vision,
            dummy,
            sample_tokens,
        )


@dataclass
class LoaderState:
    """Where the loader is: rank-independent, so a restart on another world size continues at the same pack."""

    epoch: int = 0
    packs_done: int = 0  # packs of this epoch already trained on, whatever the world size was


def epoch_order(pack_ids: list[int], epoch: int, seed: int) -> list[int]:
    """Epoch 0 keeps the pack stage's (seeded, shuffled) order; later epochs reshuffle with seed + epoch."""
    if epoch == 0:
        return list(pack_ids)
    return [pack_ids[i] for i in np.random.default_rng(seed + epoch).permutation(len(pack_ids))]


def step_assignment(
    order: list[int],
    step: int,
    world: int,
    per_device: int,
    accumulation: int,
    cost: Mapping[int, float] | None = None,
) -> Assignment:
    """Every rank's micro-batches of global step ``step``: [rank][micro-batch] -> pack ids.

    The step's packs are the next world x per_device x accumulation packs of ``order``; with ``cost`` they are
    spread over the ranks by estimated compute (balance.py), otherwise by position.
    """
    global_batch = world * per_device * accumulation
    chunk = order[step * global_batch : (step + 1) * global_batch]
    if cost is None:
        return in_order(chunk, world, per_device, accumulation)
    return balanced(chunk, cost, world, per_device, accumulation)


def epoch_straggler(
    order: list[int], cost: Mapping[int, float], world: int, per_device: int, accumulation: int, balance: bool
) -> float:
    """The mean straggler ratio over the whole steps of one epoch in ``order``, each step laid out by
    step_assignment (a short last step is left out: it idles ranks whatever the layout)."""
    steps = len(order) // (world * per_device * accumulation)
    if steps == 0:
        return 1.0
    layouts = (
        step_assignment(order, s, world, per_device, accumulation, cost if balance else None) for s in range(steps)
    )
    return sum(straggler_ratio(layout, cost) for layout in layouts) / steps


def micro_batches(mine: list[list[int]], order: list[int]) -> list[tuple[list[int], bool]]:
    """A rank's micro-batches of one step (its row of a step_assignment) as (pack ids, is_dummy): an empty one (a
    short last step) becomes a label-free copy of a real pack, so collectives stay in step and every sample is seen
    exactly once."""
    return [(ids, False) if ids else ([order[0]], True) for ids in mine]


class PrefetchLoader:
    """Builds this rank's rows in background worker processes (DataLoader), in order, from a LoaderState;
    ``pin`` (CUDA) hands them over in page-locked memory."""

    def __init__(self, builder: RowBuilder, plan: list[tuple[list[int], bool]], workers: int, pin: bool = False):
        self.dataset = _PlanDataset(builder, plan)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            multiprocessing_context="forkserver" if workers else None,
            persistent_workers=False,
            pin_memory=pin,
        )

    def __iter__(self):
        return iter(self.loader)


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, builder: RowBuilder, plan: list[tuple[list[int], bool]]):
        self.builder = builder
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Row:
        ids, dummy = self.plan[i]
        return self.builder.build(ids, dummy)
