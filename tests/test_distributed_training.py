"""Training under torchrun: two gloo processes on the CPU train the same RigNet and F (DFR) as
one process at the same global batch, up to the order of floating-point sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from server.training.stylerig.train_dfr import DFRSettings, train_dfr
from server.training.stylerig.train_rignet import RigNetSettings, train_rignet
from tests.support.server_process import REPO
from tests.support.stylerig_fixtures import write_corpus

pytestmark = [pytest.mark.training, pytest.mark.slow,
              pytest.mark.usefixtures("single_thread_module")]

STEPS, BATCH = 4, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    generator, face, embedding = write_corpus(root)
    dfr = DFRSettings(face_model=str(face), embedding=str(embedding), steps=STEPS,
                      batch_size=BATCH, hidden=64, lr=1e-3, log_every=1, checkpoint_every=2,
                      preview_every=0)
    train_dfr(root / "corpus", root / "dfr", dfr, progress=False)
    return {"root": root, "face": face, "embedding": embedding, "dfr": dfr}


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", "-m", "server.training.stylerig",
                           "--quiet", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a, b) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_two_processes_train_the_same_rignet_as_one(setup):
    root = setup["root"]
    settings = RigNetSettings(dfr=str(root / "dfr" / "dfr.safetensors"),
                              face_model=str(setup["face"]), embedding=str(setup["embedding"]),
                              steps=STEPS, batch_size=BATCH, log_every=1, checkpoint_every=2,
                              preview_every=0)
    train_rignet(root / "corpus", root / "one", settings, progress=False)
    done = torchrun("rignet", "--corpus", str(root / "corpus"), "--run-dir", str(root / "two"),
                    "--dfr", settings.dfr, "--face-model", settings.face_model,
                    "--embedding", settings.embedding, "--steps", str(STEPS),
                    "--batch-size", str(BATCH), "--log-every", "1", "--checkpoint-every", "2",
                    "--preview-every", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(root / "one" / "rignet.safetensors", root / "two" / "rignet.safetensors")
    assert losses(root / "two") == pytest.approx(losses(root / "one"), rel=1e-4)
    assert len(losses(root / "two")) == STEPS            # rank 0 alone writes the log
    # The checkpoint resumes in one process: the run folder is the same at any world size.
    state = torch.load(root / "two" / "checkpoint.pt", weights_only=True)
    assert state["step"] == STEPS and not any(k.startswith("module.") for k in state["model"])


def test_two_processes_train_the_same_dfr_as_one(setup):
    root, dfr = setup["root"], setup["dfr"]
    done = torchrun("dfr", "--corpus", str(root / "corpus"), "--run-dir", str(root / "dfr2"),
                    "--face-model", dfr.face_model, "--embedding", dfr.embedding,
                    "--steps", str(STEPS), "--batch-size", str(BATCH), "--hidden", "64",
                    "--lr", "1e-3", "--log-every", "1", "--checkpoint-every", "2",
                    "--preview-every", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(root / "dfr" / "dfr.safetensors", root / "dfr2" / "dfr.safetensors")


def test_a_batch_that_does_not_split_is_refused(setup):
    root, dfr = setup["root"], setup["dfr"]
    done = torchrun("dfr", "--corpus", str(root / "corpus"), "--run-dir", str(root / "dfr3"),
                    "--face-model", dfr.face_model, "--embedding", dfr.embedding,
                    "--steps", "1", "--batch-size", "3", "--hidden", "64")
    assert done.returncode != 0
    assert "batch size 3 does not split over 2 processes" in done.stderr


def test_each_process_takes_its_slice_of_the_steps_pairs(setup):
    from server.training.distributed import Context
    from server.training.stylerig.data import TrainingData
    from server.training.stylerig.train_rignet import Pairs

    data = TrainingData(setup["root"] / "corpus")
    settings = RigNetSettings(dfr="unused", batch_size=6)
    whole = Pairs(data, settings, step=3)
    parts = [Pairs(data, settings, 3, Context(rank, 3).shard(6)) for rank in range(3)]
    assert [len(p.w_index) for p in parts] == [2, 2, 2]
    assert sum((list(p.w_index) for p in parts), []) == list(whole.w_index)
    assert sum((list(p.v_index) for p in parts), []) == list(whole.v_index)
    assert sum((p.modes for p in parts), []) == whole.modes
