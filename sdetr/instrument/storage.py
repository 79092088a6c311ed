"""Recording files: safetensors (no pickle), written atomically, read lazily.

Format (``format_version`` 1):
- one tensor per recorded site and tensor name, keyed ``"{site}/{name}"`` (``"stage2.encoder.0.self_attn/a"``),
  in the shapes of :class:`~sdetr.instrument.grids.SiteGrids`;
- the safetensors header's ``__metadata__`` holds one entry, ``"sdetr_recording"``: a JSON object with
  ``format_version``, ``sdetr_version``, ``preset``, ``model_config``, ``checkpoint`` (the file the model
  was loaded from, or null), ``weights_sha256`` (of the model's state dict) and ``sites``: for each site
  its ``kind``, ``heads``, ``queries``, ``geometry`` and ``tensors``.
Reading one site, or one head of one tensor, touches only those bytes (memory-mapped slices).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sdetr.atomic_files import atomic_path
from sdetr.instrument.grids import GridGeometry, SiteGrids
from sdetr.model.detector import Detector

METADATA_KEY = "sdetr_recording"
FORMAT_VERSION = 1


class RecordingError(ValueError):
    """A file that is not a readable sdetr recording."""


def weights_sha256(model: Detector) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_recording(model: Detector, grids_by_site: Mapping[str, SiteGrids], path: str | os.PathLike[str]) -> Path:
    """Write recorded grids (a recorder, or any mapping of site name to grids) of ``model`` to
    ``path`` atomically (temporary file + rename)."""
    tensors: dict[str, Tensor] = {}
    site_meta: dict[str, Any] = {}
    for name, grids in grids_by_site.items():
        site_meta[name] = {
            "kind": grids.kind,
            "heads": list(grids.heads),
            "queries": None
            if grids.queries is None
            else [list(q) if isinstance(q, tuple) else q for q in grids.queries],
            "geometry": grids.geometry.to_dict(),
            "tensors": sorted(grids.tensors()),
        }
        for tensor_name, tensor in grids.tensors().items():
            tensors[f"{name}/{tensor_name}"] = tensor.detach().cpu().contiguous()
    if not tensors:
        raise RecordingError("nothing to save: the recorder holds no grids (was keep=False, or no forward run?)")
    from sdetr import __version__

    metadata = {
        "format_version": FORMAT_VERSION,
        "sdetr_version": __version__,
        "preset": model.config.name,
        "model_config": model.config.to_dict(),
        "checkpoint": getattr(model, "checkpoint_path", None),
        "weights_sha256": weights_sha256(model),
        "sites": site_meta,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
    return Path(path)


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header, including that the file holds all its data."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        raw = stream.read(8)
        if len(raw) < 8:
            raise RecordingError(f"{path}: {size} bytes - too short to be a recording (truncated?)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 * 1024**2):
            raise RecordingError(
                f"{path}: not a safetensors recording (bad header length; truncated or another format)"
            )
        try:
            header = json.loads(stream.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordingError(f"{path}: not a safetensors recording (unreadable header: {error})") from None
    if not isinstance(header, dict):
        raise RecordingError(f"{path}: not a safetensors recording (header is not an object)")
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise RecordingError(
            f"{path}: truncated - the header describes {8 + header_len + end} bytes but the file has {size}; "
            "record it again"
        )
    return header


@dataclass(frozen=True)
class SiteEntry:
    kind: str
    heads: tuple[int, ...]
    queries: tuple[Any, ...] | None
    geometry: GridGeometry
    tensors: tuple[str, ...]


class Recording(Mapping[str, SiteGrids]):
    """A recording file opened lazily: ``rec[site]`` reads that site only.

    Attributes:
        metadata: the JSON metadata (preset, versions, checkpoint identity, ...).
        entries: per site, its kind, heads, queries, geometry and tensor names.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"recording {str(self.path)!r} does not exist")
        header = _read_header(self.path)
        raw = header.get("__metadata__", {}).get(METADATA_KEY)
        if raw is None:
            raise RecordingError(
                f"{self.path}: a safetensors file, but not an sdetr recording (no {METADATA_KEY!r} metadata)"
            )
        self.metadata: dict[str, Any] = json.loads(raw)
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise RecordingError(f"{self.path}: recording format {version}; this sdetr reads {FORMAT_VERSION}")
        self.entries = {
            name: SiteEntry(
                kind=meta["kind"],
                heads=tuple(meta["heads"]),
                queries=None
                if meta["queries"] is None
                else tuple(tuple(q) if isinstance(q, list) else q for q in meta["queries"]),
                geometry=GridGeometry.from_dict(meta["geometry"]),
                tensors=tuple(meta["tensors"]),
            )
            for name, meta in self.metadata["sites"].items()
        }

    def __getitem__(self, site: str) -> SiteGrids:
        entry = self._entry(site)
        grids = SiteGrids(site=site, kind=entry.kind, heads=entry.heads, geometry=entry.geometry, queries=entry.queries)
        for name in entry.tensors:
            setattr(grids, name, self.load(site, name))
        return grids

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _entry(self, site: str) -> SiteEntry:
        if site not in self.entries:
            raise KeyError(f"{self.path}: no site {site!r}; recorded: {', '.join(self.entries)}")
        return self.entries[site]

    def load(self, site: str, tensor: str, heads: Sequence[int] | None = None) -> Tensor:
        """One tensor of one site, optionally only some heads (by head index), read lazily."""
        entry = self._entry(site)
        if tensor not in entry.tensors:
            raise KeyError(f"{self.path}: site {site!r} has no {tensor!r}; it has {entry.tensors}")
        with safe_open(str(self.path), framework="pt") as reader:
            key = f"{site}/{tensor}"
            if heads is None:
                return reader.get_tensor(key)
            positions = []
            for head in heads:
                if head not in entry.heads:
                    raise KeyError(f"{self.path}: site {site!r} recorded heads {entry.heads}, not {head}")
                positions.append(entry.heads.index(head))
            sliced = reader.get_slice(key)
            return torch.cat([sliced[:, p : p + 1] for p in positions], dim=1)


def load_recording(path: str | os.PathLike[str]) -> Recording:
    """Open a recording written by ``rec.save(path)``; sites are read when indexed."""
    return Recording(path)
