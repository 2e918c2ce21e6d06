"""`qvl`: the command line. Each subcommand is a thin shell over one stage or tool; errors print one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from schemas.errors import PipelineError


def _params_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="the pipeline config (default: params.yaml)")


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from schemas.params import load_params
    from stages.validate import run

    result = run(load_params(args.params))
    table = Table(title=f"validate: {result.input} rows in {result.seconds:.2f} s")
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_row("accepted", str(result.accepted))
    for reason, n in sorted(result.by_reason.items(), key=lambda kv: -kv[1]):
        table.add_row(f"rejected: {reason}", str(n))
    Console(stderr=True).print(table)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from schemas.params import load_params
    from stages.decode.stage import run

    r = run(load_params(args.params))
    print(
        f"decode: {r.videos} videos, {r.decoded} decoded ({r.frames} frames, {r.shard_bytes / 1e6:.1f} MB in shards, "
        f"{r.raw_bytes / 1e6:.1f} MB raw), {r.rejected} rejected ({r.samples_excluded} samples excluded) "
        f"in {r.seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from schemas.params import load_params
    from stages.tokenize import run

    r = run(load_params(args.params))
    print(
        f"tokenize: {r.input} samples, {r.tokenized} tokenized ({r.tokens} tokens, {r.label_tokens} with labels), "
        f"{r.rejected} rejected {r.by_reason} in {r.seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from schemas.params import load_params
    from stages.pack import run

    r = run(load_params(args.params))
    print(
        f"pack: {r.samples} samples into {r.packs} packs of {r.capacity} ({r.strategy}), efficiency "
        f"{r.efficiency:.4f}, {r.dropped_overlong} dropped as overlong, in {r.seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from stages.train import run

    return run(args.params)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from schemas.params import load_params
    from stages.evaluate import run

    r = run(load_params(args.params), checkpoint=args.checkpoint)
    loss = "no eval loss" if r.eval_loss is None else f"eval loss {r.eval_loss:.6f} over {r.eval_label_tokens} tokens"
    step = "" if r.step is None else f" (step {r.step})"
    print(
        f"evaluate: {r.model}{step}: {loss} of {r.eval_samples} held-out samples in {r.eval_packs} packs; "
        f"{r.generations} generations in metrics/generations.json; {r.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from schemas.params import load_params
    from stages.register import register

    rows = register(load_params(args.params))
    latest = rows[-1]
    print(
        f"registered {latest['id']} ({len(rows)} checkpoint(s) of run {latest['run']} in the registry)", file=sys.stderr
    )
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    import json

    from schemas.params import load_params
    from stages.register import read_registry

    rows = read_registry(Path(load_params(args.params).registry.path))
    if args.action == "list":
        for r in rows:
            metrics = r["metrics"]
            print(f"{r['id']}\tstep {r['step']}\tloss {metrics.get('loss', metrics.get('final_loss'))}\t{r['path']}")
        return 0
    match = [r for r in rows if r["id"] == args.id or r["id"].startswith(args.id or "\0")]
    if not match:
        print(f"qvl registry show: no checkpoint {args.id!r}", file=sys.stderr)
        return 2
    print(json.dumps(match[-1], indent=2, default=str))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline through the Prefect flow, in-process (ephemeral Prefect, no server needed)."""
    import os
    import time

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to start: a fresh clone on two busy cores took longer (seen here).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    start = time.perf_counter()
    from flows.pipeline import qwen_vl_pipeline

    state = qwen_vl_pipeline(project_dir=str(Path.cwd()), return_state=True)
    if not state.is_completed():
        print(f"qvl run: error: {state.message}", file=sys.stderr)
        return 1
    latest = state.result()
    print(
        f"pipeline done in {time.perf_counter() - start:.1f} s; registered {latest['id']} ({latest['hf_path']})",
        file=sys.stderr,
    )
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    """`dvc repro` after repairing what a killed dvc process can leave behind (see flows.stage_runner)."""
    from flows.stage_runner import dvc

    return dvc("repro", *args.targets, project_dir=Path.cwd()).returncode


def cmd_demo(args: argparse.Namespace) -> int:
    from stages.demo import write_demo

    print(f"demo dataset written to {write_demo(args.dir)}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from stages.tiny_model import make_tiny_model

    print(f"tiny {args.family} model written to {make_tiny_model(args.family, args.dir)}")
    return 0


def cmd_import_lmms(args: argparse.Namespace) -> int:
    from stages.import_lmms import import_lmms, write_params

    report = import_lmms(args.file)
    write_params(report, Path(args.output))
    print(f"wrote {args.output}")
    if report.unmapped or report.notes:
        print(f"{len(report.unmapped)} key(s) not carried over:", file=sys.stderr)
        print("\n".join(report.lines()), file=sys.stderr)
    return 0


def cmd_setup_demo(args: argparse.Namespace) -> int:
    """Everything the default params.yaml points at: the demo data and the tiny models (Qwen2.5-VL and Qwen3-VL,
    and those of the families asked for with --family)."""
    from stages.demo import write_demo
    from stages.tiny_model import make_tiny_model

    if args.force or not Path("data/demo").exists():
        write_demo("data/demo")
    for fam in dict.fromkeys(["qwen2_5_vl", "qwen3_vl", *(args.family or [])]):
        if args.force or not Path(f"models/tiny-{fam}").exists():
            make_tiny_model(fam, f"models/tiny-{fam}")
    print("demo data in data/demo, tiny models in models/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stages.families import FAMILY_NAMES

    parser = argparse.ArgumentParser(prog="qvl", description="Fine-tuning pipeline for Qwen2.5-VL and Qwen3-VL.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable]] = [
        ("run", "run the whole pipeline (Prefect flow over the DVC stages) on this machine", cmd_run),
        ("repro", "dvc repro (all stages or the named ones), safe to rerun after a killed run", cmd_repro),
        ("validate", "load the datasets into DuckDB, apply the rules, write samples and rejects", cmd_validate),
        ("decode", "decode every video of the accepted samples once into lossless frame shards", cmd_decode),
        ("tokenize", "render and tokenise every accepted sample with the real Qwen processor", cmd_tokenize),
        ("pack", "pack tokenized samples into fixed-capacity packs (first-fit family)", cmd_pack),
        (
            "train",
            "train with torchrun (FSDP2, padding-free packed rows), checkpoint, export to Hugging Face",
            cmd_train,
        ),
        ("evaluate", "eval loss of the trained model on the held-out packs, and a few of its answers", cmd_evaluate),
        ("register", "record the run's checkpoints with their lineage in the registry", cmd_register),
        ("registry", "list the registered checkpoints, or show one", cmd_registry),
        ("demo", "write the demo dataset (images, videos, chat rows with known bad rows) to DIR", cmd_demo),
        (
            "make-tiny-model",
            "write a tiny random Qwen-VL model with a real offline processor to DIR",
            cmd_make_tiny_model,
        ),
        ("import-lmms", "convert an lmms-engine trainer YAML into params.yaml", cmd_import_lmms),
        ("setup-demo", "create data/demo and the tiny models that the default params.yaml uses", cmd_setup_demo),
    ]
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        if name in ("validate", "decode", "tokenize", "pack", "train", "evaluate", "register", "registry"):
            _params_arg(p)
        if name == "repro":
            p.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
        if name == "evaluate":
            p.add_argument(
                "--checkpoint", help="a from_pretrained or checkpoint-<step> directory (default: the run's export)"
            )
        if name == "registry":
            p.add_argument("action", choices=["list", "show"])
            p.add_argument("id", nargs="?", help="checkpoint id (or a prefix) for show")
        elif name == "demo":
            p.add_argument("dir", help="output directory (replaced atomically)")
        elif name == "make-tiny-model":
            p.add_argument("--family", choices=FAMILY_NAMES, default="qwen2_5_vl")
            p.add_argument("dir", help="output directory (replaced atomically)")
        elif name == "import-lmms":
            p.add_argument("file", help="the lmms-engine YAML")
            p.add_argument("-o", "--output", default="params.yaml", help="where to write (default: params.yaml)")
        elif name == "setup-demo":
            p.add_argument("--force", action="store_true", help="rebuild even if present")
            p.add_argument(
                "--family",
                action="append",
                choices=FAMILY_NAMES,
                help="also build models/tiny-<family> (repeatable), e.g. qwen2_vl, qwen3_vl_moe",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PipelineError as exc:
        print(f"qvl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qvl {args.command}: interrupted; outputs were not replaced", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
