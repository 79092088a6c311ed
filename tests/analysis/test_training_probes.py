from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis.quick_model import QuickRun, quick_checkpoint, quick_dataset
from analysis.training_probes import ProbeRun, maps_over_epochs, plot_epoch_maps, probe_recordings
from sdetr import Detector, GridGeometry, SiteGrids, build_model, load_model, record, save_recording

SITE = "stage2.encoder.0.self_attn"
# two images padded into a 32x48 batch at stride 16: a 2x3 grid; the second image is 32x32 (2x2 cells)
GEOMETRY = GridGeometry(16, (2, 3), (32, 48), ((32, 48), (32, 32)), ((2, 3), (2, 2)), ((32, 48), (32, 32)))


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


def hand_map(epoch: int) -> torch.Tensor:
    """``[2, 1, 2, 3, 2, 3]``: image, head, query cell, key cell; distinct values per epoch."""
    return torch.arange(72, dtype=torch.float32).reshape(2, 1, 2, 3, 2, 3) / 128 + epoch


def write_epochs(model: Detector, folder: Path, epochs: list[int], selected: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        a = hand_map(epoch)
        queries = None
        if selected:  # the query cells (1, 2) and (0, 1) only: [B, heads, P, H, W]
            a, queries = torch.stack([a[:, :, 1, 2], a[:, :, 0, 1]], dim=2), ((1, 2), (0, 1))
        grids = SiteGrids(SITE, "encoder_self", (0,), GEOMETRY, queries=queries, a=a)
        save_recording(model, {SITE: grids}, folder / f"epoch_{epoch:04d}.safetensors")


def test_probe_recordings_finds_epochs_from_any_run_path(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "recordings"
    folder.mkdir(parents=True)
    for name in ("epoch_0002.safetensors", "epoch_0000.safetensors", "epoch_0010.safetensors", "notes.txt"):
        (folder / name).write_bytes(b"")
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")
    expected = {0: folder / "epoch_0000.safetensors", 2: folder / "epoch_0002.safetensors"}
    expected[10] = folder / "epoch_0010.safetensors"
    for path in (tmp_path / "run", folder, tmp_path / "run" / "checkpoint.pth"):
        found = probe_recordings(path)
        assert found == expected and list(found) == [0, 2, 10]
    with pytest.raises(FileNotFoundError, match="train with probes on"):
        probe_recordings(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        probe_recordings(tmp_path / "missing")


def test_maps_over_epochs_reads_one_cell_per_epoch(tiny: Detector, tmp_path: Path) -> None:
    write_epochs(tiny, tmp_path / "recordings", [0, 3])
    maps = maps_over_epochs(probe_recordings(tmp_path), SITE, (1, 2))
    assert maps.epochs == [0, 3]
    assert torch.equal(maps.maps, torch.stack([hand_map(0)[0, 0, 1, 2], hand_map(3)[0, 0, 1, 2]]))
    second = maps_over_epochs(probe_recordings(tmp_path), SITE, (0, 1), index=1)  # 2x2 valid cells of image 1
    assert torch.equal(second.maps[1], hand_map(3)[1, 0, 0, 1, :, :2])
    assert second.geometry == GEOMETRY and second.query_cell == (0, 1) and second.index == 1

    write_epochs(tiny, tmp_path / "picked", [1], selected=True)
    picked = maps_over_epochs(probe_recordings(tmp_path / "picked"), SITE, (0, 1))
    assert torch.equal(picked.maps[0], hand_map(1)[0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"query cell \(1, 1\) not recorded"):
        maps_over_epochs(probe_recordings(tmp_path / "picked"), SITE, (1, 1))


def test_maps_over_epochs_rejects_bad_arguments(tiny: Detector, tmp_path: Path) -> None:
    write_epochs(tiny, tmp_path / "recordings", [0])
    found = probe_recordings(tmp_path)
    with pytest.raises(KeyError, match=r"site 'stage1.encoder.0.self_attn' was not probed; probed sites: stage2"):
        maps_over_epochs(found, "stage1.encoder.0.self_attn", (0, 0))
    with pytest.raises(ValueError, match=r"query_cell=\(1, 2\) is outside image 1's 2x2 valid cells"):
        maps_over_epochs(found, SITE, (1, 2), index=1)
    with pytest.raises(ValueError, match="the probe batch has 2 image"):
        maps_over_epochs(found, SITE, (0, 0), index=2)
    with pytest.raises(ValueError, match="recordings is empty"):
        maps_over_epochs({}, SITE, (0, 0))


def test_plot_epoch_maps_draws_each_epoch_on_one_scale(tiny: Detector, tmp_path: Path) -> None:
    write_epochs(tiny, tmp_path / "recordings", [0, 1, 2])
    maps = maps_over_epochs(probe_recordings(tmp_path), SITE, (1, 2))
    image = torch.rand(3, 32, 48)
    figure = plot_epoch_maps(maps, image, columns=2)
    drawn = [ax for ax in figure.axes if ax.get_title().startswith("epoch")]
    assert [ax.get_title() for ax in drawn] == ["epoch 0", "epoch 1", "epoch 2"]
    for ax, expected in zip(drawn, maps.maps, strict=True):
        overlay = ax.images[-1]
        assert torch.allclose(torch.as_tensor(overlay.get_array().data), expected)
        assert overlay.get_clim() == (0.0, pytest.approx(float(maps.maps.max())))
        assert ax.lines[0].get_xydata()[0].tolist() == [40.0, 24.0]  # centre of cell (1, 2)
    assert sum(1 for ax in figure.axes if not ax.axison) == 1  # 2x2 panels for 3 epochs: one left blank


def test_probe_run_trains_and_its_recordings_match_the_final_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path))
    run = ProbeRun(epochs=2, train_images=2, val_images=2, batch_size=2, probe_images=2)
    assert run.key() != QuickRun(epochs=2, train_images=2, val_images=2, batch_size=2).key()
    assert run.train_config(tmp_path).probe_sites == "stage2.encoder.*"
    checkpoint = quick_checkpoint(run)
    found = probe_recordings(checkpoint)
    assert list(found) == [0, 1]
    maps = maps_over_epochs(found, "stage2.encoder.1.self_attn", (3, 4))
    assert torch.allclose(maps.maps.sum((1, 2)), torch.ones(2), atol=2e-3)  # float16 maps, softmax rows
    model = load_model(checkpoint)  # the last epoch's weights
    dataset = quick_dataset(run)
    with torch.no_grad(), record(model, sites="stage2.encoder.1.self_attn", dtype=torch.float32) as rec:
        model([dataset[0][0], dataset[1][0]])
    a = rec["stage2.encoder.1.self_attn"].a
    assert a is not None
    rows, cols = maps.maps.shape[1:]
    assert torch.allclose(maps.maps[-1], a[0, 0, 3, 4, :rows, :cols], atol=1e-3)
