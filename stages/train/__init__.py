"""The train stage: check the inputs, then launch `torchrun` with one worker per rank and stream its output.

`qvl train` runs `python -m torch.distributed.run ... -m stages.train.worker` in its own process group, so an
interrupt or a failure stops every rank (Prefect cancellation included); exit status is torchrun's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow.parquet as pq

from schemas.errors import ConfigError, StageInputError
from schemas.params import Params, load_params
from stages.families import family
from stages.fast_exit import exit_now
from stages.train.reporters import check_available

PACKS = Path("data/packed/packs.parquet")
TOKENIZED = Path("data/tokenized/samples.parquet")


def nproc_per_node(params: Params) -> int:
    if params.trainer_args.nproc_per_node:
        return params.trainer_args.nproc_per_node
    import torch

    return torch.cuda.device_count() or 1


def tokenizer_size(processor_dir: Path, expected: int) -> int:
    """``len(tokenizer)`` of the processor in ``processor_dir`` (what tokenize records), read cheaply where it can:
    the Rust tokenizer of ``tokenizer.json`` counts ``expected`` in 0.4 s where transformers' Qwen2Tokenizer, which
    rebuilds its vocabulary in Python, takes 1.3-1.8 s (measured); any other count is checked by transformers."""
    file = processor_dir / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        if Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True) == expected:
            return expected
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(processor_dir))


def preflight(params: Params, root: Path, world: int) -> None:
    """Every input problem as one clear error, before any process starts."""
    model_dir = root / params.model_config_.load_from_pretrained_path
    if not (model_dir / "config.json").is_file():
        raise StageInputError(
            f"model directory not found or has no config.json: {model_dir} (model_config.load_from_pretrained_path)"
        )
    config = json.loads((model_dir / "config.json").read_text())
    fam = family(params.dataset_config.processor_config.processor_type)
    if fam.model_class not in (config.get("architectures") or [fam.model_class]):
        raise ConfigError(
            f"{model_dir} holds {config.get('architectures')}, but processor_type "
            f"{fam.processor_type!r} expects {fam.model_class}"
        )
    import torch
    from transformers import AutoConfig

    from stages.train.model import choose_attention, wrap_classes
    from stages.train.sequence_parallel import check_degree

    model_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # the architecture only, no weights: checks the FSDP wrap classes
        architecture = fam.transformers_class(fam.model_class)._from_config(model_config)
    wrap_classes(architecture, params, fam)
    sp_degree = params.trainer_args.sp_ulysses_degree
    check_degree(sp_degree, world, model_config.text_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the ranks will train on
    choose_attention(params.model_config_.attn_implementation, device, sp_degree, params.trainer_args.bf16)
    import pyarrow as pa
    import pyarrow.compute as pc

    from stages.arrowfile import open_arrow
    from stages.train.samples import EVAL_PACKS, TOKENIZED_ARROW, check_pack_rows

    for path in (PACKS, TOKENIZED, TOKENIZED_ARROW):
        if not (root / path).is_file():
            raise StageInputError(f"{root / path} not found: run `qvl tokenize` and `qvl pack` first")
    # The data checks run on Arrow columns (the token ids memory-mapped), never on Python lists of every sample.
    tokenized = open_arrow(root / TOKENIZED_ARROW, "tokenize")
    vocab = (config.get("text_config") or config).get("vocab_size")
    top = pc.max(pc.list_flatten(tokenized.column("input_ids"))).as_py()
    if vocab and top is not None and top >= vocab:
        raise StageInputError(
            f"tokenized data holds token id {top} but the model's vocabulary "
            f"has {vocab}: the processor does not match the tokenized data; re-run tokenize"
        )
    recorded = (pq.read_schema(root / TOKENIZED).metadata or {}).get(b"tokenizer_vocab_size")
    processor_dir = Path(params.dataset_config.processor_config.processor_name)
    if recorded and (size := tokenizer_size(processor_dir, expected := int(recorded))) != expected:
        raise StageInputError(
            f"the processor's tokenizer has {size} tokens but the data was tokenized "
            f"with {expected}: re-run tokenize with this processor"
        )
    packed = check_pack_rows(pq.read_table(root / PACKS, columns=["sample_ids", "sample_rows"]), tokenized)
    if params.trainer_args.eval_strategy != "no":
        held_out = root / EVAL_PACKS
        if not held_out.is_file() or pq.read_metadata(held_out).num_rows == 0:
            raise StageInputError(
                f"trainer_args.eval_strategy is {params.trainer_args.eval_strategy!r} but {held_out} holds no packs: "
                "hold out eval data with dataset_config.eval_ratio or eval_datasets, then re-run validate and pack"
            )
        check_pack_rows(pq.read_table(held_out, columns=["sample_ids", "sample_rows"]), tokenized)
    videos = pc.unique(pc.list_flatten(tokenized.column("video_keys")))
    if len(videos):
        index = root / "data/frames/index.parquet"
        present = (
            pq.read_table(index, columns=["video_key"]).column(0)
            if index.is_file()
            else pa.chunked_array([], pa.string())
        )
        absent = videos.filter(pc.invert(pc.is_in(videos, value_set=present.combine_chunks())))
        if len(absent):
            raise StageInputError(
                f"{len(absent)} video(s) of the tokenized data are missing from data/frames: re-run decode"
            )
    args = params.trainer_args
    data_parallel = world // sp_degree
    if len(packed) < data_parallel * args.per_device_train_batch_size:
        raise ConfigError(
            f"{len(packed)} pack(s) cannot feed {data_parallel} data-parallel group(s) x per_device_train_batch_size "
            f"{args.per_device_train_batch_size}; use fewer processes or a smaller packing_length"
        )
    check_available(args.report_to)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_torchrun(nproc: int, *program: str) -> list[str]:
    """torchrun on this machine alone (``nproc`` ranks, a free loopback port) running ``program``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *program,
    ]


def torchrun_command(params: Params, params_path: str, nproc: int) -> list[str]:
    args = params.trainer_args
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={args.nnodes}"]
    rdzv = os.environ.get("QVL_RDZV_ENDPOINT")
    if args.nnodes > 1 or rdzv:
        cmd += [
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv or 'localhost:29400'}",
            f"--rdzv_id={os.environ.get('QVL_RDZV_ID', args.run_name)}",
        ]
    else:
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return cmd + ["-m", "stages.train.worker", "--params", params_path]


def _die_with_parent() -> None:
    """In the torchrun child (Linux): SIGTERM it when `qvl train` dies, even by SIGKILL, so no rank outlives it
    (torchrun stops its workers on SIGTERM)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the torchrun process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _ranks_stop_with_us(proc: subprocess.Popen, grace: float = 30) -> Iterator[list[int]]:
    """While the block waits for torchrun: SIGTERM or SIGINT to `qvl train` is passed to torchrun's process group
    (torchrun stops its ranks; SIGKILL follows after ``grace`` seconds) and recorded in the yielded list. The
    handler does not wait itself: it interrupts the block's own `proc.wait()`, whose lock it cannot take. Any
    other way out of the block (an exception) stops the ranks too."""
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        timer = threading.Timer(grace, _kill_group, (proc,))
        timer.daemon = True
        timer.start()

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_group(proc, grace)


def run(params_path: str, root: Path = Path(".")) -> NoReturn:
    """Preflight, then torchrun; the process then exits at once with torchrun's status, or with 128 + N after
    signal N stopped the run (every rank is gone by then), without tearing down torch and transformers (see
    `exit_now`): neither a pipeline nor a cancelled flow run waits on that. The last call of `qvl train`'s process."""
    params = load_params(params_path)
    nproc = nproc_per_node(params)
    preflight(params, root, nproc * params.trainer_args.nnodes)
    cmd = torchrun_command(params, params_path, nproc)
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, preexec_fn=preexec)
    with _ranks_stop_with_us(proc) as received:
        code = proc.wait()
    exit_now(128 + received[0] if received else code)
