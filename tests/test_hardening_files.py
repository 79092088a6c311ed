"""Issue 11: interrupted saves leave no lasting temporaries; written files get the default permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sdetr import build_model, record, save_model
from sdetr.atomic_files import STALE_AFTER_S, atomic_path, remove_stale_temporaries
from sdetr.engine.evaluation import write_json_atomic


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_process_default_permissions(tmp_path: Path, umask_027: None) -> None:
    """Issue 11: checkpoints, detections and recordings were 0600 while log.txt got the umask's 0644."""
    (tmp_path / "log.txt").write_text("")  # what plain open() gives: 0o666 & ~0o027
    assert mode(tmp_path / "log.txt") == 0o640
    model = build_model("sdetr-tiny", num_classes=2).eval()
    checkpoint = save_model(model, tmp_path / "checkpoint.pth")
    detections = write_json_atomic([], tmp_path / "detections_val.json")
    with torch.no_grad(), record(model, sites="stage2.encoder.0.self_attn", tensors=("a",)) as rec:
        model(torch.zeros(1, 3, 64, 64))
    recording = rec.save(tmp_path / "rec.safetensors")
    assert [mode(p) for p in (checkpoint, detections, recording)] == [0o640, 0o640, 0o640]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_temporary_of_a_killed_save_is_removed_by_the_next_save(tmp_path: Path) -> None:
    """Issue 11: a SIGKILL during a save left a partial .checkpoint.pth.*.tmp that was never cleaned."""
    target = tmp_path / "checkpoint.pth"
    killed = tmp_path / f".checkpoint.pth.{dead_pid()}.0123abcd.tmp"  # a writer that no longer runs
    killed.write_bytes(b"half a checkpoint")
    old_style = tmp_path / ".checkpoint.pth.k2j4x_9q.tmp"  # mkstemp's name, from before process ids
    old_style.write_bytes(b"older")
    os.utime(old_style, (0, 0))
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            in_progress = tmp_path / f".checkpoint.pth.{alive.pid}.89abcdef.tmp"  # another process still writing
            in_progress.write_bytes(b"being written")
            recent_old_style = tmp_path / ".checkpoint.pth.abcdefgh.tmp"
            recent_old_style.write_bytes(b"maybe being written")
            other = tmp_path / ".log.txt.1.0123abcd.tmp"  # another target's
            other.write_bytes(b"")
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"new")
            assert target.read_bytes() == b"new"
            left = sorted(p.name for p in tmp_path.iterdir())
            assert left == sorted(["checkpoint.pth", in_progress.name, recent_old_style.name, other.name])
        finally:
            alive.kill()
    assert remove_stale_temporaries(target) == [in_progress]  # its writer is gone now
    assert STALE_AFTER_S >= 600  # an old-style temporary is only taken for abandoned after a long time
