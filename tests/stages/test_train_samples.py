"""The trainer reads the tokenized samples memory-mapped (data/tokenized/samples.arrow) and builds the same rows,
bit for bit, as from Python lists of the Parquet file; DataLoader workers get the file's path, not its rows."""

import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig

from schemas.errors import StageInputError
from stages.families import family
from stages.train.data import IGNORE, RowBuilder
from stages.train.samples import PACKS, TOKENIZED_ARROW, TokenizedSamples, check_pack_rows
from tests.conftest import pipeline_params, processor_of


def builder_of(packed_project) -> RowBuilder:
    root, family_name, model_dir = packed_project
    fam = family(family_name)
    cfg = pipeline_params(model_dir, family_name).dataset_config
    return RowBuilder.for_family(root, processor_of(model_dir), cfg, fam, AutoConfig.from_pretrained(model_dir))


def test_the_arrow_file_holds_the_parquet_rows(packed_project):
    root = packed_project[0]
    parquet = pq.read_table(root / "data/tokenized/samples.parquet")
    mapped = TokenizedSamples(root / TOKENIZED_ARROW)
    assert mapped.table.equals(parquet)
    assert mapped.table.schema.metadata == parquet.schema.metadata


def test_rows_equal_the_rows_of_python_lists(packed_project):
    root = packed_project[0]
    builder = builder_of(packed_project)
    tokenized = {s["sample_id"]: s for s in pq.read_table(root / "data/tokenized/samples.parquet").to_pylist()}
    packs = pq.read_table(root / PACKS).to_pylist()
    assert list(builder.packs) == [p["pack_id"] for p in packs]
    for pack in packs:
        assert builder.packs[pack["pack_id"]] == pack["sample_ids"]
        ids = [t for s in pack["sample_ids"] for t in tokenized[s]["input_ids"]]
        targets = [t for s in pack["sample_ids"] for t in tokenized[s]["labels"][1:] + [IGNORE]]
        row = builder.build([pack["pack_id"]])
        assert row.input_ids.dtype == row.targets.dtype == torch.long
        assert row.input_ids[0, : len(ids)].tolist() == ids  # then the label-free dummy segments
        assert row.targets[0, : len(ids)].tolist() == targets
    for sample_id in list(tokenized)[:5]:
        assert builder.samples[sample_id] == tokenized[sample_id]


def test_workers_get_the_path_not_the_rows(packed_project):
    builder = builder_of(packed_project)
    assert len(pickle.dumps(builder.samples)) < 1000 < builder.samples.table.nbytes
    copy = pickle.loads(pickle.dumps(builder))  # what a DataLoader worker receives
    pack_id = next(iter(builder.packs))
    a, b = builder.build([pack_id]), copy.build([pack_id])
    for name in ("input_ids", "targets", "position_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.vision.keys() == b.vision.keys() and all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)


def test_packs_whose_rows_do_not_name_their_samples_are_refused(packed_project, tmp_path):
    """The trainer reads packed samples by row number; packs made from other tokenized data (a row number that
    now holds another sample, or no row at all) or by an older pack (no row numbers) are named, not trained."""
    root = packed_project[0]
    packs = pq.read_table(root / PACKS)
    tokenized = TokenizedSamples(root / TOKENIZED_ARROW).table
    assert check_pack_rows(packs, tokenized) is packs
    rows = packs.column("sample_rows").to_pylist()
    at = packs.schema.get_field_index("sample_rows")
    for change, first_id in (
        (lambda r: r[0].__setitem__(0, r[0][0] + 1), packs.column("sample_ids")[0][0].as_py()),
        (lambda r: r[-1].__setitem__(-1, tokenized.num_rows), packs.column("sample_ids")[-1][-1].as_py()),
        (lambda r: r[-1].__setitem__(-1, -1), packs.column("sample_ids")[-1][-1].as_py()),
    ):
        changed = [list(r) for r in rows]
        change(changed)
        broken = packs.set_column(at, "sample_rows", pa.array(changed, pa.list_(pa.int64())))
        with pytest.raises(StageInputError, match=rf"^1 sample\(s\) .*\(e.g. {first_id}\): re-run pack after tokenize"):
            check_pack_rows(broken, tokenized)
    with pytest.raises(StageInputError, match="no sample_rows .*re-run pack"):
        check_pack_rows(packs.remove_column(at), tokenized)
    with pytest.raises(StageInputError, match="samples.arrow not found: run `qvl tokenize`"):
        TokenizedSamples(tmp_path / "samples.arrow")


def test_preflight_names_data_that_does_not_match(packed_project, tmp_path):
    """The data checks of `qvl train` (run on Arrow columns): packed ids, token ids, decoded videos, the file."""
    from stages.train import preflight

    source, family_name, model_dir = packed_project
    params = pipeline_params(model_dir, family_name)
    vocab = AutoConfig.from_pretrained(model_dir).text_config.vocab_size

    def broken(name: str, change) -> Path:
        root = tmp_path / name
        shutil.copytree(source / "data", root / "data", ignore=shutil.ignore_patterns("demo"))
        change(root)
        return root

    def extra_packed_id(root):
        packs = pq.read_table(root / PACKS)
        ids, rows = packs.column("sample_ids").to_pylist(), packs.column("sample_rows").to_pylist()
        ids[-1], rows[-1] = ids[-1] + ["no-such-sample"], rows[-1] + [0]
        packs = packs.set_column(1, "sample_ids", pa.array(ids, pa.list_(pa.string())))
        pq.write_table(packs.set_column(2, "sample_rows", pa.array(rows, pa.list_(pa.int64()))), root / PACKS)

    def token_past_vocab(root):
        rows = TokenizedSamples(root / TOKENIZED_ARROW).table
        ids = rows.column("input_ids").to_pylist()
        ids[-1][-1] = vocab
        fixed = rows.set_column(1, "input_ids", pa.array(ids, pa.list_(pa.int32())))
        with pa.ipc.new_file(str(root / "fixed.arrow"), fixed.schema) as writer:  # not over the mapped file
            writer.write_table(fixed)
        (root / "fixed.arrow").replace(root / TOKENIZED_ARROW)

    def video_not_decoded(root):
        index = root / "data/frames/index.parquet"
        pq.write_table(pq.read_table(index).slice(1), index)

    cases = {
        "packs": (extra_packed_id, r"1 sample\(s\) in the packs are not at their row .* \(e.g. no-such-sample\)"),
        "vocab": (token_past_vocab, f"tokenized data holds token id {vocab} but the model's vocabulary has {vocab}"),
        "video": (video_not_decoded, r"1 video\(s\) of the tokenized data are missing from data/frames"),
        "arrow": (lambda root: (root / TOKENIZED_ARROW).unlink(), "samples.arrow not found: run `qvl tokenize`"),
    }
    preflight(params, broken("good", lambda root: None), 2)
    for name, (change, message) in cases.items():
        with pytest.raises(StageInputError, match=message):
            preflight(params, broken(name, change), 2)
