"""Issue 11: a run SIGKILLed during a save and then mid-epoch, resumed with ``--resume`` each
time, ends bit-identical to an uninterrupted run, with no temporary file left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from sdetr.engine.trainer import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[2]
#: 4 training images in one step per epoch, 3 epochs, augmentation on (RNG state matters).
ARGS = [
    "--epochs", "3", "--lr_drop", "2", "--low_res_epochs", "0", "--batch_size", "4", "--max_train_images", "4",
    "--eval_every", "0",
    "--synthetic_train", "4", "--synthetic_val", "1", "--device", "cpu", "--seed", "3", "--augment",
    "--set", "hidden_dim=32", "--set", "ffn_dim=32", "--set", "num_queries=6",
]  # fmt: skip

#: Runs train.main in a child process that SIGKILLs itself at a chosen moment (no cleanup runs).
CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(2)
sys.path.insert(0, {repo!r})
import train
from sdetr import checkpoints
from sdetr.atomic_files import atomic_path
from sdetr.model.criterion import SetCriterion

moment, argv = sys.argv[1], sys.argv[2:]
if moment == "during_second_save":
    original, saves = checkpoints.atomic_save, []

    def dying_save(obj, path):
        saves.append(path)
        if len(saves) < 2:
            return original(obj, path)
        with atomic_path(path) as tmp:  # half of the checkpoint is on disk when the process dies
            torch.save(obj, tmp)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.atomic_save = dying_save
else:  # "mid_epoch": in the 2nd step this process runs (the first epoch done and saved, the next begun)
    forward, calls = SetCriterion.forward, []

    def dying_forward(self, outputs, targets, **options):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, outputs, targets, **options)

    SetCriterion.forward = dying_forward
sys.exit(train.main(argv))
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def killed_run(moment: str, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    script = CHILD.format(repo=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script, moment, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_sigkill_during_a_save_and_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    torch.set_num_threads(2)  # as the child processes: bit-identity needs the same float sums
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train.main([*ARGS, "--output_dir", str(straight)]) == 0

    killed_run("during_second_save", [*ARGS, "--output_dir", str(killed)])
    checkpoint = killed / CHECKPOINT_NAME
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0  # the interrupted save left the previous one
    leftovers = [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pth.")  # what SIGKILL leaves

    killed_run("mid_epoch", ["--resume", str(checkpoint)])  # epoch 1, save, then dies in epoch 2
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert train.main(["--resume", str(checkpoint)]) == 0  # the run's own options, from the checkpoint

    assert sorted(p.name for p in killed.iterdir()) == ["checkpoint.pth", "log.txt"]  # no temporary left
    one, two = (torch.load(d / CHECKPOINT_NAME, weights_only=True) for d in (straight, killed))
    assert one["epoch"] == two["epoch"] == 2
    assert one["model"].keys() == two["model"].keys()
    for key in one["model"]:
        assert torch.equal(one["model"][key], two["model"][key]), key
    logs = [[json.loads(line) for line in (d / "log.txt").read_text().splitlines()] for d in (straight, killed)]
    assert [e["epoch"] for e in logs[1]] == [0, 1, 2]
    assert [e["train_loss"] for e in logs[0]] == [e["train_loss"] for e in logs[1]]
