"""Checkpoint files: this project's own, original SDETR ones and official DETR R50 ones.

Loading never executes pickled code: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` (the original ``args``) allow-listed. Saving writes a temporary file
next to the target and renames it into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdetr.atomic_files import atomic_path
from sdetr.config import BACKBONE_CHANNELS, ConfigError, ModelConfig, StageConfig, get_config
from sdetr.errors import UserError
from sdetr.model.backbone import BackboneSpeed
from sdetr.model.detector import Detector
from sdetr.model.resnet_blocks import STAGE_PLANES

#: Marker key of this project's checkpoint files.
FORMAT_KEY = "sdetr_format"
FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class KeyMismatch:
    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped (key, checkpoint, model)", self.mis_shaped),
        ):
            if items:
                shown = "\n    ".join(str(item) for item in items[:limit])
                more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
                lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------- original key names

#: (pattern, replacement) applied in order to map original key names to sdetr's.
_ORIGINAL_RENAMES: list[tuple[str, str]] = [
    (r"^backbone\.0\.body\.", "backbone.body."),
    (r"^backbone\.1\.(row_embed|col_embed)", r"stage1.position.\1"),
    (r"^mytransformer(\d+)\.", r"stage\1."),
    (r"^transformer\.", "stage1."),
    (r"^input_proj(\d+)\.", r"stage\1.input_proj."),
    (r"^input_proj\.", "stage1.input_proj."),
    (r"^query_embed(\d+)\.", r"stage\1.query_embed."),
    (r"^query_embed\.", "stage1.query_embed."),
    (r"\.multihead_attn\.", ".cross_attn."),
]


def rename_original_key(key: str) -> str:
    """Original SDETR / DETR state-dict name -> sdetr name."""
    for pattern, replacement in _ORIGINAL_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def to_original_key(key: str, original_family: str) -> str:
    """sdetr name -> original name, for ``original_family`` ``"sdetr"`` or ``"detr"``."""
    key = key.replace(".cross_attn.", ".multihead_attn.")
    key = re.sub(r"^backbone\.body\.", "backbone.0.body.", key)
    key = re.sub(r"^stage1\.position\.", "backbone.1.", key)
    if original_family == "detr":
        key = re.sub(r"^stage1\.(input_proj|query_embed)\.", r"\1.", key)
        return re.sub(r"^stage1\.", "transformer.", key)
    key = re.sub(r"^stage(\d+)\.(input_proj|query_embed)\.", r"\2\1.", key)
    return re.sub(r"^stage(\d+)\.", r"mytransformer\1.", key)


def to_original_state_dict(model: Detector, original_family: str) -> dict[str, Tensor]:
    """The model's weights under the original code's names (for exporting)."""
    return {to_original_key(k, original_family): v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- config inference


def _indices(keys: set[str], pattern: str) -> set[int]:
    """The distinct integers captured by ``pattern`` over ``keys``."""
    return {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}


def _infer_backbone(keys: set[str]) -> str:
    bottleneck = "backbone.body.layer1.0.conv3.weight" in keys
    layer3_blocks = len(_indices(keys, r"backbone\.body\.layer3\.(\d+)\."))
    if bottleneck:
        return "resnet101" if layer3_blocks >= 23 else "resnet50"
    if layer3_blocks == 1:
        return "resnet10"
    return "resnet34" if layer3_blocks >= 6 else "resnet18"  # (no layer3 at all: the key check names what is missing)


def infer_config(state: Mapping[str, Tensor], args: Any = None, base: ModelConfig | None = None) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from an (sdetr-named) state dict and original ``args``.

    Shapes give layer counts, sizes, queries, classes, levels and the backbone (its width from the
    stem's channels, its stem from the first convolution's kernel). Heads and
    dilation are invisible in shapes: they come from ``args`` (``nheads``, ``dilation``) or
    ``base``, else from the matching preset (``sdetr``: 8 heads, 1 in the stage-2 encoder;
    ``detr``: 8 everywhere).
    """
    keys = set(state)
    stage_ids = sorted(_indices(keys, r"stage(\d+)\."))
    if not stage_ids or "class_embed.weight" not in keys or "stage1.query_embed.weight" not in keys:
        raise CheckpointError(
            "the state dict has no SDETR/DETR keys (expected 'mytransformer1.*' or 'transformer.*', "
            "'query_embed*' and 'class_embed.weight'); it is not a checkpoint of these models"
        )
    base = base or get_config("sdetr" if len(stage_ids) >= 2 else "detr")
    nheads = getattr(args, "nheads", None)
    backbone = _infer_backbone(keys)
    stem = state.get("backbone.body.conv1.weight")  # [64 * width, 3, 7, 7]; [.., 4, 4]: a patchify stem
    width = stem.shape[0] / STAGE_PLANES[0] if stem is not None else base.backbone_width
    stem_kind = base.backbone_stem if stem is None else "patchify" if stem.shape[-1] == 4 else "resnet"
    shaped = base.replace(backbone=backbone, backbone_width=width, backbone_stem=stem_kind, backbone_weights=None)
    channel_to_level = {shaped.feature_channels(level): level for level in BACKBONE_CHANNELS[backbone]}  # type: ignore[arg-type]
    stages = []
    for index in stage_ids:
        template = base.stages[min(index, len(base.stages)) - 1]
        in_channels = state[f"stage{index}.input_proj.weight"].shape[1]
        if in_channels not in channel_to_level:
            raise CheckpointError(f"stage{index}.input_proj takes {in_channels} channels, no level of {backbone}")
        enc_layers = len(_indices(keys, rf"stage{index}\.encoder\.layers\.(\d+)\."))
        dec_layers = len(_indices(keys, rf"stage{index}\.decoder\.layers\.(\d+)\."))
        stages.append(
            StageConfig(
                feature=channel_to_level[in_channels],  # type: ignore[arg-type]
                encoder_layers=enc_layers,
                decoder_layers=dec_layers,
                # the original `nheads` flag sets stage 1 and all decoders; stage-2 encoders keep theirs
                encoder_heads=_heads(template.encoder_heads, enc_layers, nheads if index == 1 else None),
                decoder_heads=_heads(template.decoder_heads, dec_layers, nheads),
                from_previous=index > 1,
            )
        )
    first_linear = next(k for k in sorted(keys) if re.match(r"stage1\.(en|de)coder\.layers\.0\.linear1\.weight", k))
    return shaped.replace(
        dilation=bool(getattr(args, "dilation", base.dilation)),
        hidden_dim=state["class_embed.weight"].shape[1],
        ffn_dim=state[first_linear].shape[0],
        dropout=float(getattr(args, "dropout", base.dropout)),
        position="learned" if "stage1.position.row_embed.weight" in keys else "sine",
        norm_first="stage1.encoder.norm.weight" in keys,
        num_classes=state["class_embed.weight"].shape[0] - 1,
        num_queries=state["stage1.query_embed.weight"].shape[0],
        stages=tuple(stages),
    )


def _heads(template: int | tuple[int, ...], layers: int, override: int | None) -> int | tuple[int, ...]:
    """Heads per layer for ``layers`` layers: ``override``, else the template's."""
    if override is not None:
        return int(override)
    if isinstance(template, int):
        return template
    if len(template) == layers:
        return template
    return template[0]


# ---------------------------------------------------------------- reading files


#: How a ``torch.save`` file starts: a zip archive (the default since PyTorch 1.6) or a legacy pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def read_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)`` (only ``argparse.Namespace`` allowed) with clear errors.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, not a ``torch.save`` file, truncated or corrupt, or holding
            Python objects other than tensors and containers (refused, never executed).
    """
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file in it (e.g. {path / 'checkpoint.pth'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with path.open("rb") as stream:
            head = stream.read(4)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not head.startswith(_TORCH_MAGIC):
        what = "an empty file" if not head else f"a file starting with {head!r}"
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({what}; torch.save writes a zip archive). "
            "Check the path, or download or save it again."
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        message = str(error)
        if "Unsupported global" in message:
            found = re.search(r"GLOBAL (\S+)", message)
            culprit = f"; it refers to {found.group(1)}" if found else ""
            raise CheckpointError(
                f"{path}: refused to load - it contains Python objects other than tensors and "
                f"argparse.Namespace, which weights_only loading never executes{culprit}. "
                "Re-save only the state dict from a trusted environment."
            ) from None
        text = message.split("\n")[0] or "end of file"
        raise CheckpointError(
            f"{path}: could not be read as a PyTorch checkpoint ({type(error).__name__}: {text}). "
            "The file is probably truncated or corrupt; download or save it again."
        ) from None


def _split(obj: Any, source: str) -> tuple[dict[str, Tensor], Any, dict[str, Any] | None]:
    """-> (state dict with sdetr names, original args or None, sdetr config dict or None)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a checkpoint dict")
    if FORMAT_KEY in obj:
        model, config = obj.get("model"), obj.get("config")
        if not isinstance(model, Mapping) or not all(isinstance(v, Tensor) for v in model.values()):
            raise CheckpointError(f"{source}: an sdetr checkpoint without a 'model' state dict of tensors")
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{source}: an sdetr checkpoint without its 'config' dict")
        return dict(model), None, dict(config)
    args = obj.get("args")
    state = obj.get("model", obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{source}: no state dict found (expected a 'model' entry of tensors, as in the "
            f"original SDETR/DETR files; top-level keys: {sorted(map(str, obj))[:10]})"
        )
    renamed = {rename_original_key(str(k)): v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}
    return renamed, args, None


def compare_keys(model: nn.Module, state: Mapping[str, Tensor]) -> KeyMismatch:
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return KeyMismatch(
        missing=sorted(set(expected) - set(state)),
        unexpected=sorted(set(state) - set(expected)),
        mis_shaped=sorted(
            (k, tuple(state[k].shape), tuple(v.shape))
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    )


def load_model(
    source: str | os.PathLike[str] | Mapping[str, Any],
    preset: str | None = None,
    config: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    speed: str | BackboneSpeed = "default",
    compile: bool = False,
) -> Detector:
    """A ready model in eval mode from a checkpoint file or an already loaded dict.

    Accepts this project's checkpoints, original SDETR checkpoint files and official DETR R50
    files (a dict with ``model`` and maybe ``args``, or a bare state dict). The architecture
    is inferred from the keys and ``args``; ``preset`` or ``config`` override it (heads cannot
    be seen in shapes: use ``preset="sdetr-multihead"`` for that ablation's files).
    ``speed`` is :meth:`Detector.set_speed` (``"default"``, ``"fast"`` or ``"exact"``);
    ``compile=True`` (opt-in) is :meth:`Detector.compile_parts` with ``dynamic=True``. Both move
    outputs by float32 rounding only; see the README's "Speed".

    Raises:
        CheckpointError: unreadable file, not a checkpoint of these models, or keys that do
            not fit (the message lists missing, unexpected and mis-shaped keys).
    """
    if isinstance(source, Mapping):
        name, obj = "state dict", source
    else:
        name, obj = str(source), read_checkpoint(Path(source))
    state, args, saved_config = _split(obj, name)
    if config is None:
        if saved_config is not None and preset is None:
            try:
                config = ModelConfig.from_dict(saved_config)
            except ConfigError as error:
                raise CheckpointError(f"{name}: its stored model config is not valid ({error})") from None
        else:
            try:
                config = infer_config(state, args, get_config(preset) if preset else None)
            except CheckpointError as error:
                raise CheckpointError(f"{name}: {error}") from None
            except (ConfigError, ValueError, TypeError, KeyError, IndexError, StopIteration) as error:
                reason = f"{type(error).__name__}: {error}"
                raise CheckpointError(
                    f"{name}: its weights and args do not describe an SDETR/DETR model ({reason})"
                ) from None
    model = Detector(config)
    mismatch = compare_keys(model, state)
    if mismatch:
        raise CheckpointError(
            f"{name}: the weights do not fit the {config.name!r} architecture "
            f"({config.backbone}, {len(config.stages)} stage(s)):\n{mismatch.describe()}\n"
            "Pass preset=... or config=... if the file is of another variant."
        )
    model.load_state_dict(state, strict=False)
    model.checkpoint_path = None if isinstance(source, Mapping) else str(Path(source).resolve())
    model = model.to(device).eval().set_speed(speed)
    return model.compile_parts(dynamic=True) if compile else model


# ---------------------------------------------------------------- writing files


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_model(model: Detector, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Save a model (plus extra entries such as optimizer state) in sdetr's format, atomically."""
    payload = {FORMAT_KEY: FORMAT_VERSION, "config": model.config.to_dict(), "model": model.state_dict(), **extra}
    return atomic_save(payload, path)
