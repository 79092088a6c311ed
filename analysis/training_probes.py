"""The grids forming during training, read from the trainer's probe recordings.

``TrainConfig(probe_sites=..., probe_every=..., probe_images=...)`` (``train.py --probe_sites``)
records the chosen sites on a fixed batch - the first ``probe_images`` validation images - and
writes ``<output_dir>/recordings/epoch_XXXX.safetensors``. This module finds those files, reads
one query cell's attention map from each (one head, through ``Recording.load``'s memory-mapped
slices), and draws the maps side by side. :class:`ProbeRun` is a :class:`QuickRun` with probes on,
so :func:`analysis.quick_model.quick_checkpoint` trains and caches a probed run like any other.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from analysis.quick_model import QuickRun
from sdetr import GridGeometry, Recording, TrainConfig, load_recording

RECORDING_NAME = re.compile(r"^epoch_(\d+)\.safetensors$")


@dataclass(frozen=True)
class ProbeRun(QuickRun):
    """A :class:`QuickRun` that also records ``probe_sites`` every ``probe_every`` epochs.

    The recordings land in ``recordings/`` next to the cached checkpoint
    (``quick_checkpoint(ProbeRun(...)).parent / "recordings"``). Every field enters the cache key.
    """

    probe_sites: str = "stage2.encoder.*"
    probe_every: int = 1
    probe_images: int = 2

    def train_config(self, output_dir: str | os.PathLike[str]) -> TrainConfig:
        return dataclasses.replace(
            super().train_config(output_dir),
            probe_sites=self.probe_sites,
            probe_every=self.probe_every,
            probe_images=self.probe_images,
        )


def probe_recordings(path: str | os.PathLike[str]) -> dict[int, Path]:
    """The probe recordings of a run, by epoch (0-based, ascending).

    Args:
        path: the run's output folder (holding ``recordings/``), the ``recordings`` folder itself,
            or the run's ``checkpoint.pth``.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    folder = path / "recordings" if (path / "recordings").is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a training run's output folder or its recordings/")
    found = {
        int(match.group(1)): entry
        for entry in folder.iterdir()
        if entry.is_file() and (match := RECORDING_NAME.match(entry.name))
    }
    if not found:
        raise FileNotFoundError(
            f"no epoch_XXXX.safetensors in {folder}; train with probes on "
            "(train.py --probe_sites 'stage2.encoder.*' --probe_every 1, or TrainConfig(probe_sites=...))"
        )
    return dict(sorted(found.items()))


@dataclass
class EpochMaps:
    """One query cell's attention map at every recorded epoch.

    Attributes:
        site / head / query_cell / index: what was read (``index``: image of the probe batch).
        epochs: the epochs, ascending.
        maps: ``[E, rows, cols]`` float32, each over the image's valid key cells (sums to 1).
        geometry: the site's grid geometry (stride, valid sizes) of the last epoch's recording.
    """

    site: str
    head: int
    query_cell: tuple[int, int]
    index: int
    epochs: list[int]
    maps: Tensor
    geometry: GridGeometry


def maps_over_epochs(
    recordings: Mapping[int, str | os.PathLike[str] | Recording],
    site: str,
    query_cell: tuple[int, int],
    index: int = 0,
    head: int = 0,
) -> EpochMaps:
    """Read ``site``'s attention map of ``query_cell`` (one head, one image) from each epoch's recording.

    Args:
        recordings: epoch -> recording file or opened ``Recording`` (:func:`probe_recordings`).
        site: an encoder self-attention site that was probed.
        query_cell: ``(row, col)`` on the site's grid.
        index: image of the probe batch; head: head index at the site.
    """
    if not recordings:
        raise ValueError("recordings is empty: no epochs to read (see probe_recordings)")
    epochs = sorted(recordings)
    row, col = query_cell
    maps: list[Tensor] = []
    geometry: GridGeometry | None = None
    for epoch in epochs:
        source = recordings[epoch]
        rec = source if isinstance(source, Recording) else load_recording(source)
        if site not in rec.entries:
            raise KeyError(f"{rec.path}: site {site!r} was not probed; probed sites: {', '.join(rec.entries)}")
        entry = rec.entries[site]
        if entry.kind != "encoder_self":
            raise ValueError(f"site={site!r} is {entry.kind}; maps_over_epochs reads encoder self-attention maps")
        geometry = entry.geometry
        if not 0 <= index < len(geometry.valid_cells):
            raise ValueError(f"index={index}: the probe batch has {len(geometry.valid_cells)} image(s)")
        rows, cols = geometry.valid_cells[index]
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"query_cell={query_cell} is outside image {index}'s {rows}x{cols} valid cells")
        a = rec.load(site, "a", heads=[head])[index, 0].float()  # [B, 1, ...] -> [H, W, H, W] or [P, H, W]
        if entry.queries is None:
            maps.append(a[row, col, :rows, :cols])  # [H, W, H, W] -> [rows, cols]
        else:
            if (row, col) not in entry.queries:
                raise ValueError(f"{rec.path}: query cell {query_cell} not recorded; recorded: {entry.queries}")
            maps.append(a[entry.queries.index((row, col)), :rows, :cols])  # [P, H, W] -> [rows, cols]
    if len({tuple(m.shape) for m in maps}) != 1:
        raise ValueError(f"{site}: the recordings have different grids {[tuple(m.shape) for m in maps]}")
    assert geometry is not None
    return EpochMaps(site, head, (row, col), index, epochs, torch.stack(maps), geometry)  # [E, rows, cols]


def plot_epoch_maps(maps: EpochMaps, image: Tensor | None = None, columns: int = 6) -> Figure:
    """The attention map of :func:`maps_over_epochs` at each epoch, on one colour scale.

    Args:
        maps: the maps to draw.
        image: ``[3, H, W]`` RGB in [0, 1] of the probe image at input resolution, or None.
        columns: panels per row.
    """
    count = len(maps.epochs)
    ncols = min(columns, count)
    nrows = math.ceil(count / ncols)
    figure = Figure(figsize=(2.6 * ncols + 0.8, 2.3 * nrows + 0.5), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    geometry = maps.geometry
    assert geometry.stride is not None
    rows, cols = maps.maps.shape[1:]
    height, width = geometry.valid_sizes[maps.index]
    extent = (0, cols * geometry.stride, rows * geometry.stride, 0)
    cy, cx = geometry.cell_to_pixel(*maps.query_cell)
    vmax = float(maps.maps.max())
    shown = None
    for position, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if position >= count:
            ax.set_axis_off()
            continue
        if image is not None:
            ax.imshow(image[:, :height, :width].permute(1, 2, 0).clamp(0, 1).numpy())
        shown = ax.imshow(
            maps.maps[position].numpy(),
            cmap="magma",
            vmin=0.0,
            vmax=vmax,
            alpha=0.7 if image is not None else 1.0,
            extent=extent,
        )
        ax.plot([cx], [cy], marker="+", color="lime", markersize=12, mew=2)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"epoch {maps.epochs[position]}", fontsize=9)
    if shown is not None:
        figure.colorbar(shown, ax=axes, shrink=0.8, label="attention weight")
    figure.suptitle(f"{maps.site}, head {maps.head}: A of query cell {maps.query_cell}, image {maps.index}")
    return figure
