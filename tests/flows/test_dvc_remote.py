"""The GPU dispatch's DVC remote checks and the train record's round trip, on a real git + DVC repository."""

import sys

import pytest
import yaml

from flows import dvc_remote
from flows.stage_runner import StageFailed
from tests.flows.helpers import sh


@pytest.fixture
def repo(tmp_path):
    sh("git", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    return tmp_path


def test_no_remote_is_a_clear_error(repo):
    with pytest.raises(StageFailed, match="needs a DVC remote.*orchestration.dvc_remote"):
        dvc_remote.push(repo, None, ("pack",))


def test_unknown_remote_name_is_a_clear_error(repo, tmp_path_factory):
    sh(sys.executable, "-m", "dvc", "remote", "add", "--local", "storage", str(tmp_path_factory.mktemp("r")), cwd=repo)
    with pytest.raises(StageFailed, match="'storge' is not a DVC remote .*configured: storage"):
        dvc_remote.pull(repo, "storge", ("pack",))


def test_other_commit_on_the_gpu_checkout_is_refused(repo):
    (repo / "f").write_text("x")
    sh("git", "add", "f", cwd=repo)
    sh("git", "-c", "user.email=a@b.c", "-c", "user.name=a", "commit", "-qm", "x", cwd=repo)
    dvc_remote.check_same_commit(repo, dvc_remote.git_commit(repo))
    dvc_remote.check_same_commit(repo, None)
    with pytest.raises(StageFailed, match="check out the same commit on the GPU host"):
        dvc_remote.check_same_commit(repo, "0" * 40)


def test_train_record_round_trip_keeps_bytes_and_the_other_stages(tmp_path):
    gpu, here = tmp_path / "gpu", tmp_path / "here"
    outs = [{"path": "output/demo", "md5": "abc.dir"}, {"path": "plots/train_loss.csv", "md5": "def"}]
    for root, stages in ((gpu, {"train": {"cmd": "t", "outs": outs}}), (here, {"pack": {"cmd": "p"}})):
        (root / "plots").mkdir(parents=True)
        (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    (gpu / "output/demo").mkdir(parents=True)
    (gpu / "plots/train_loss.csv").write_bytes(b"step,loss\r\n1,2.5\r\n")
    (gpu / "metrics").mkdir()
    (gpu / "metrics/train_speed.json").write_text('{"tokens_per_s": 9000.5}')  # the GPU's figures travel back too
    dvc_remote.apply_train_record(here, dvc_remote.train_record(gpu))
    assert (here / "plots/train_loss.csv").read_bytes() == b"step,loss\r\n1,2.5\r\n"
    assert (here / "metrics/train_speed.json").read_text() == '{"tokens_per_s": 9000.5}'
    assert yaml.safe_load((here / "dvc.lock").read_text())["stages"] == {
        "pack": {"cmd": "p"},
        "train": {"cmd": "t", "outs": outs},
    }
