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


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file -> (header dict, data bytes)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_file(path: Path, header: object, body: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return path


def with_metadata(source: Path, target: Path, metadata: object) -> Path:
    """``source`` with its sdetr metadata replaced by ``metadata`` (a string is stored as is)."""
    header, body = split_file(source)
    header["__metadata__"]["sdetr_recording"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return join_file(target, header, body)


def test_malformed_metadata_is_a_recording_error_naming_the_file(recorded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: such metadata raised JSONDecodeError, KeyError, AttributeError or TypeError."""
    path = recorded.save(tmp_path / "rec.safetensors")
    meta = json.loads(split_file(path)[0]["__metadata__"]["sdetr_recording"])
    site = "stage1.encoder.0.self_attn"
    cases = [
        ("{not json", "metadata is not JSON"),
        ([1, 2], "metadata is a JSON list, not an object"),
        ({k: v for k, v in meta.items() if k != "sites"}, "no 'sites' object"),
        ({**meta, "sites": []}, "no 'sites' object"),
        ({**meta, "sites": {site: 3}}, f"site '{site}': its metadata is a int"),
        ({**meta, "sites": {site: {**meta["sites"][site], "kind": "cross"}}}, "field 'kind' is 'cross'"),
        ({**meta, "sites": {site: {**meta["sites"][site], "heads": "0,1"}}}, "field 'heads' is '0,1'"),
        ({**meta, "sites": {site: {**meta["sites"][site], "queries": [[1]]}}}, r"field 'queries' is \[\[1\]\]"),
        ({**meta, "sites": {site: {**meta["sites"][site], "tensors": ["z"]}}}, r"field 'tensors' is \['z'\]"),
        ({**meta, "sites": {site: {**meta["sites"][site], "geometry": {}}}}, "field 'geometry' is {}; expected a grid"),
        ({**meta, "sites": {site: {**meta["sites"][site], "geometry": None}}}, "field 'geometry' is None"),
        ({**meta, "sites": {"other": meta["sites"][site]}}, r"site 'other': tensors \[.*\] are listed .*not stored"),
        ({**meta, "format_version": "1"}, "recording format '1'"),
    ]
    for field in ("kind", "heads", "queries", "geometry", "tensors"):
        site_meta = {k: v for k, v in meta["sites"][site].items() if k != field}
        cases.append(({**meta, "sites": {site: site_meta}}, f"metadata field '{field}' is missing"))
    for index, (metadata, message) in enumerate(cases):
        bad = with_metadata(path, tmp_path / f"bad{index}.safetensors", metadata)
        with pytest.raises(RecordingError, match=rf"bad{index}\.safetensors: .*{message}"):
            load_recording(bad)


def test_a_tensor_whose_shape_disagrees_with_its_bytes_names_the_file(recorded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: this gave a SafetensorError without the file's name."""
    path = recorded.save(tmp_path / "rec.safetensors")
    header, body = split_file(path)
    key = "stage1.encoder.0.self_attn/q"
    header[key]["shape"] = [header[key]["shape"][0] * 2, *header[key]["shape"][1:]]
    bad = join_file(tmp_path / "shape.safetensors", header, body)
    with pytest.raises(
        RecordingError, match=rf"shape\.safetensors: tensor '{key}' is F16 of shape .* bytes\) but its data range holds"
    ):
        load_recording(bad)
    for entry, message in [
        ({"dtype": "F99", "shape": [1], "data_offsets": [0, 2]}, "unknown dtype 'F99'"),
        ({"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}, r"shape \[-1\]"),
        ({"dtype": "F16", "shape": [1], "data_offsets": [2, 0]}, r"data_offsets \[2, 0\]"),
        ("x", "header entry is not an object"),
    ]:
        header, body = split_file(path)
        header[key] = entry
        with pytest.raises(RecordingError, match=rf"entry\.safetensors: tensor '{key}'.*{message}"):
            load_recording(join_file(tmp_path / "entry.safetensors", header, body))
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(RecordingError, match=r"folder\.safetensors is a folder"):
        load_recording(tmp_path / "folder.safetensors")
