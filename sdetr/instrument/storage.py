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
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from sdetr.atomic_files import atomic_path
from sdetr.errors import UserError
from sdetr.instrument.grids import GridGeometry, SiteGrids
from sdetr.model.detector import Detector

METADATA_KEY = "sdetr_recording"
FORMAT_VERSION = 1


class RecordingError(UserError, ValueError):
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


#: Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
SITE_KINDS = ("encoder_self", "decoder_self", "decoder_cross")
TENSOR_NAMES = ("q", "k", "v", "a")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header: every tensor's dtype, shape and byte range agree,
    and the file holds all its data."""
    try:
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
            header_bytes = stream.read(header_len)
    except OSError as error:
        raise RecordingError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RecordingError(f"{path}: not a safetensors recording (unreadable header: {error})") from None
    if not isinstance(header, dict):
        raise RecordingError(f"{path}: not a safetensors recording (header is not an object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise RecordingError(f"{path}: not a safetensors recording (__metadata__ is not a string map)")
            continue
        end = max(end, _check_entry(path, key, entry))
    if 8 + header_len + end > size:
        raise RecordingError(
            f"{path}: truncated - the header describes {8 + header_len + end} bytes but the file has {size}; "
            "record it again"
        )
    return header


def _check_entry(path: Path, key: str, entry: Any) -> int:
    """One tensor's header entry is well formed and its byte range fits its shape; returns its end."""
    if not isinstance(entry, dict):
        raise RecordingError(f"{path}: tensor {key!r}: its header entry is not an object; the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise RecordingError(f"{path}: tensor {key!r} has an unknown dtype {dtype!r}; the file is corrupt")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise RecordingError(f"{path}: tensor {key!r} has shape {shape!r}, not a list of sizes; the file is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise RecordingError(f"{path}: tensor {key!r} has data_offsets {offsets!r}; the file is corrupt")
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise RecordingError(
            f"{path}: tensor {key!r} is {dtype} of shape {tuple(shape)} ({expected} bytes) but its data range holds "
            f"{offsets[1] - offsets[0]} bytes; the file is corrupt - record it again"
        )
    return int(offsets[1])


def _parse_metadata(path: Path, raw: str, tensor_keys: set[str]) -> tuple[dict[str, Any], dict[str, SiteEntry]]:
    """The recording's JSON metadata and one entry per site, every field checked.

    Raises:
        RecordingError: naming the file, the site and the field that is missing or malformed.
    """
    try:
        metadata = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise RecordingError(f"{path}: its {METADATA_KEY!r} metadata is not JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise RecordingError(
            f"{path}: its {METADATA_KEY!r} metadata is a JSON {type(metadata).__name__}, not an object"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordingError(f"{path}: recording format {version!r}; this sdetr reads {FORMAT_VERSION}")
    sites = metadata.get("sites")
    if not isinstance(sites, dict):
        raise RecordingError(f"{path}: its metadata has no 'sites' object (got {type(sites).__name__})")
    return metadata, {str(name): _site_entry(path, str(name), meta, tensor_keys) for name, meta in sites.items()}


def _site_entry(path: Path, name: str, meta: Any, tensor_keys: set[str]) -> SiteEntry:
    def bad(field: str, expected: str) -> RecordingError:
        value = meta.get(field, "missing") if isinstance(meta, dict) else meta
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return RecordingError(f"{path}: site {name!r}: metadata field {field!r} is {shown}; expected {expected}")

    if not isinstance(meta, dict):
        raise RecordingError(f"{path}: site {name!r}: its metadata is a {type(meta).__name__}, not an object")
    for field in ("kind", "heads", "queries", "geometry", "tensors"):
        if field not in meta:
            raise RecordingError(f"{path}: site {name!r}: metadata field {field!r} is missing")
    if meta["kind"] not in SITE_KINDS:
        raise bad("kind", f"one of {', '.join(SITE_KINDS)}")
    heads = meta["heads"]
    if not isinstance(heads, list) or not heads or not all(_is_int(h) and h >= 0 for h in heads):
        raise bad("heads", "a non-empty list of head indices")
    queries = meta["queries"]
    if queries is not None and not (
        isinstance(queries, list)
        and all(_is_int(q) or (isinstance(q, list) and len(q) == 2 and all(_is_int(i) for i in q)) for q in queries)
    ):
        raise bad("queries", "null or a list of query indices or [row, col] cells")
    tensors = meta["tensors"]
    if not isinstance(tensors, list) or not tensors or not all(t in TENSOR_NAMES for t in tensors):
        raise bad("tensors", f"a non-empty list of {', '.join(TENSOR_NAMES)}")
    missing = [t for t in tensors if f"{name}/{t}" not in tensor_keys]
    if missing:
        raise RecordingError(f"{path}: site {name!r}: tensors {missing} are listed in the metadata but not stored")
    problem = _geometry_problem(meta["geometry"])
    if problem is not None:
        raise bad("geometry", f"a grid geometry ({problem})")
    geometry = GridGeometry.from_dict(meta["geometry"])
    return SiteEntry(
        kind=meta["kind"],
        heads=tuple(heads),
        queries=None if queries is None else tuple(tuple(q) if isinstance(q, list) else q for q in queries),
        geometry=geometry,
        tensors=tuple(tensors),
    )


def _geometry_problem(data: Any) -> str | None:
    """What is wrong with a stored :class:`GridGeometry` dict (None: nothing)."""

    def size(value: Any) -> bool:
        return isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value)

    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    fields = ("stride", "feature_size", "input_size", "valid_sizes", "valid_cells", "image_sizes")
    missing = [f for f in fields if f not in data]
    if missing:
        return f"no {', '.join(missing)}"
    if data["stride"] is not None and not (_is_int(data["stride"]) and data["stride"] > 0):
        return "stride is not a positive integer or null"
    if data["feature_size"] is not None and not size(data["feature_size"]):
        return "feature_size is not [height, width] or null"
    if not size(data["input_size"]):
        return "input_size is not [height, width]"
    for name in ("valid_sizes", "valid_cells", "image_sizes"):
        if not isinstance(data[name], list) or not all(size(v) for v in data[name]):
            return f"{name} is not a list of [height, width]"
    return None


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
        if self.path.is_dir():
            raise RecordingError(f"{self.path} is a folder; pass a recording file (.safetensors) in it")
        if not self.path.is_file():
            raise FileNotFoundError(f"recording {str(self.path)!r} does not exist")
        header = _read_header(self.path)
        raw = header.get("__metadata__", {}).get(METADATA_KEY)
        if raw is None:
            raise RecordingError(
                f"{self.path}: a safetensors file, but not an sdetr recording (no {METADATA_KEY!r} metadata)"
            )
        tensor_keys = {key for key in header if key != "__metadata__"}
        self.metadata, self.entries = _parse_metadata(self.path, raw, tensor_keys)

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
        positions = []
        for head in heads if heads is not None else ():
            if head not in entry.heads:
                raise KeyError(f"{self.path}: site {site!r} recorded heads {entry.heads}, not {head}")
            positions.append(entry.heads.index(head))
        key = f"{site}/{tensor}"
        try:
            with safe_open(str(self.path), framework="pt") as reader:
                if heads is None:
                    return reader.get_tensor(key)
                sliced = reader.get_slice(key)
                return torch.cat([sliced[:, p : p + 1] for p in positions], dim=1)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            text = str(error).split("\n")[0]
            raise RecordingError(
                f"{self.path}: tensor {key!r} cannot be read ({type(error).__name__}: {text}); record it again"
            ) from None


def load_recording(path: str | os.PathLike[str]) -> Recording:
    """Open a recording written by ``rec.save(path)``; sites are read when indexed."""
    return Recording(path)
