"""Recording files: round trip, lazy reads, metadata, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdetr import Detector, RecordingError, __version__, load_recording, record, save_model
from sdetr.instrument.storage import weights_sha256


@pytest.fixture
def recorded(tiny: Detector, batch):  # type: ignore[no-untyped-def]
    images, mask = batch
    with (
        torch.no_grad(),
        record(tiny, sites=["stage1.encoder.*", "stage2.decoder.0.cross_attn"], decoder_queries=[1, 4]) as rec,
    ):
        tiny(images, mask)
    return rec


def test_round_trip(recorded, tmp_path: Path, tiny: Detector) -> None:  # type: ignore[no-untyped-def]
    path = recorded.save(tmp_path / "rec.safetensors")
    loaded = load_recording(path)
    assert list(loaded) == list(recorded)
    for name in recorded:
        a, b = recorded[name], loaded[name]
        assert (a.kind, a.heads, a.queries, a.geometry) == (b.kind, b.heads, b.queries, b.geometry)
        for key, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[key])
    meta = loaded.metadata
    assert meta["preset"] == "sdetr-tiny" and meta["sdetr_version"] == __version__
    assert meta["weights_sha256"] == weights_sha256(tiny) and meta["checkpoint"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["rec.safetensors"]  # atomic: no temporary left


def test_lazy_single_head(recorded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loaded = load_recording(recorded.save(tmp_path / "rec.safetensors"))
    head = loaded.load("stage1.encoder.0.self_attn", "a", heads=[2])
    torch.testing.assert_close(head, recorded["stage1.encoder.0.self_attn"].a[:, 2:3])
    with pytest.raises(KeyError, match="recorded heads"):
        loaded.load("stage1.encoder.0.self_attn", "a", heads=[7])
    with pytest.raises(KeyError, match="no site"):
        loaded["stage2.encoder.0.self_attn"]


def test_checkpoint_identity_is_recorded(tiny: Detector, tmp_path: Path) -> None:
    from sdetr import load_model

    model = load_model(save_model(tiny, tmp_path / "m.pth"))
    with torch.no_grad(), record(model, sites="stage1.encoder.0.self_attn") as rec:
        model(torch.randn(1, 3, 64, 64))
    meta = load_recording(rec.save(tmp_path / "r.safetensors")).metadata
    assert meta["checkpoint"] == str((tmp_path / "m.pth").resolve())
    assert meta["weights_sha256"] == weights_sha256(tiny)


def test_truncated_file(recorded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = recorded.save(tmp_path / "rec.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(RecordingError, match=r"cut\.safetensors: truncated"):
        load_recording(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(RecordingError, match="too short"):
        load_recording(cut)


def test_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(RecordingError, match="not an sdetr recording"):
        load_recording(other)
    pth = tmp_path / "model.pth"
    torch.save({"model": {}}, pth)
    with pytest.raises(RecordingError, match=r"model\.pth: not a safetensors recording"):
        load_recording(pth)
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(2)}, str(future), metadata={"sdetr_recording": json.dumps({"format_version": 99})})
    with pytest.raises(RecordingError, match="format 99"):
        load_recording(future)


def test_nothing_to_save(tiny: Detector, tmp_path: Path) -> None:
    with torch.no_grad(), record(tiny, keep=False, callback=lambda s, g: None) as rec:
        tiny(torch.randn(1, 3, 64, 64))
    with pytest.raises(RecordingError, match="nothing to save"):
        rec.save(tmp_path / "empty.safetensors")
