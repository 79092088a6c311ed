"""Loading original SDETR / DETR files and sdetr's own; parity with an independent reference."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from sdetr import CheckpointError, build_model, load_model, save_model, to_original_state_dict
from tests.conftest import read_reference_tsv
from tests.reference_impl import RefDETR, RefSDETR, original_checkpoint, randomize_


def assert_outputs_equal(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0)
    assert len(ours["aux_outputs"]) == len(theirs["aux_outputs"]) == 5
    for a, b in zip(ours["aux_outputs"], theirs["aux_outputs"], strict=True):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("preset", "family", "tsv"),
    [("sdetr", "sdetr", "sdetr_original_state_dict.tsv"), ("detr", "detr", "detr_r50_original_state_dict.tsv")],
)
def test_original_names_and_shapes_match_reference_listing(preset: str, family: str, tsv: str) -> None:
    expected = read_reference_tsv(tsv)
    ours = {k: tuple(v.shape) for k, v in to_original_state_dict(build_model(preset), family).items()}
    assert ours == expected


def test_reference_impl_matches_reference_listing() -> None:
    """The test's own reference model really has the original names (so parity means something)."""
    expected = read_reference_tsv("sdetr_original_state_dict.tsv")
    assert {k: tuple(v.shape) for k, v in RefSDETR().state_dict().items()} == expected


@pytest.fixture(scope="module")
def ref_sdetr() -> RefSDETR:
    return randomize_(RefSDETR(), seed=1)  # type: ignore[return-value]


def test_sdetr_parity_with_reference_on_padded_batch(ref_sdetr: RefSDETR, padded_batch) -> None:
    images, mask = padded_batch
    model = load_model(ref_sdetr.state_dict())
    assert model.config.stages[1].encoder_heads == 1 and model.config.stages[1].feature == "c4"
    with torch.no_grad():
        assert_outputs_equal(model(images, mask), ref_sdetr(images, mask))


def test_sdetr_list_input_equals_padded_tensor(ref_sdetr: RefSDETR, padded_batch) -> None:
    images, mask = padded_batch
    model = load_model(ref_sdetr.state_dict())
    with torch.no_grad():
        from_list = model([images[0], images[1, :, :96, :128]])
        assert_outputs_equal(from_list, ref_sdetr(images, mask))


def test_original_file_round_trip(ref_sdetr: RefSDETR, padded_batch, tmp_path: Path) -> None:
    images, mask = padded_batch
    path = tmp_path / "checkpoint0149.pth"
    torch.save(original_checkpoint(ref_sdetr, nheads=8, dilation=False, dropout=0.1), path)
    model = load_model(path)
    assert not model.training
    with torch.no_grad():
        assert_outputs_equal(model(images, mask), ref_sdetr(images, mask))


def test_detr_parity_from_official_file(padded_batch, tmp_path: Path) -> None:
    images, mask = padded_batch
    ref = randomize_(RefDETR(), seed=2)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": ref.state_dict()}, path)  # released DETR files hold only `model`
    model = load_model(path)
    assert model.config.name == "detr" and len(model.config.stages) == 1
    with torch.no_grad():
        assert_outputs_equal(model(images, mask), ref(images, mask))


def test_multihead_ablation_needs_preset_and_then_matches(padded_batch) -> None:
    images, mask = padded_batch
    ref = randomize_(RefSDETR(stage2_encoder_heads=8), seed=3)
    model = load_model(ref.state_dict(), preset="sdetr-multihead")
    with torch.no_grad():
        assert_outputs_equal(model(images, mask), ref(images, mask))
        # heads are invisible in shapes: loaded as single-head the outputs differ
        single = load_model(ref.state_dict())
        assert not torch.allclose(single(images, mask)["pred_boxes"], ref(images, mask)["pred_boxes"], atol=1e-4)


def test_own_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model("sdetr-tiny", num_classes=7).eval()
    path = save_model(model, tmp_path / "tiny.pth", epoch=3)
    loaded = load_model(path)
    assert loaded.config == model.config
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["pred_boxes"], model(images)["pred_boxes"], atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pth"]  # no temporary file left behind


@pytest.mark.parametrize(("backbone", "blocks"), [("resnet10", 1), ("resnet18", 2), ("resnet34", 6)])
def test_basic_block_backbones_are_told_apart_by_their_blocks(backbone: str, blocks: int) -> None:
    """A bare state dict (no stored config) names its backbone by layer3's block count."""
    model = build_model("sdetr-tiny", num_classes=5, backbone=backbone)
    keys = {key.split(".")[3] for key in model.state_dict() if key.startswith("backbone.body.layer3.")}
    assert len(keys) == blocks
    assert load_model(dict(model.state_dict()), preset="sdetr-tiny").config.backbone == backbone


@pytest.mark.parametrize("stem", ["resnet", "patchify"])
@pytest.mark.parametrize("width", [0.5, 0.75, 1.5])
def test_a_bare_state_dict_gives_its_backbone_width_by_the_stems_channels(width: float, stem: str) -> None:
    """Without a stored config the width comes from conv1 (``64 * width`` filters), so the
    stages' input channels are read as the right levels, whichever the stem (the preset's is
    patchify, at width 0.5)."""
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5, backbone_width=width, backbone_stem=stem).eval()
    loaded = load_model(dict(model.state_dict()), preset="sdetr-tiny")
    assert loaded.config.backbone_width == width and loaded.config.backbone_stem == stem
    assert [stage.feature for stage in loaded.config.stages] == ["c5", "c4"]
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(images)["pred_logits"], model(images)["pred_logits"])


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = save_model(build_model("sdetr-tiny"), tmp_path / "full.pth")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        load_model(truncated)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        load_model(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_model(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("executed",))


def test_pickled_code_is_never_executed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": {}, "payload": _Evil()}, f)
    torch.save({"model": {}, "payload": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match=name):
            load_model(tmp_path / name)
    assert "executed" not in capsys.readouterr().out


def test_checkpoint_of_another_model_is_rejected(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a checkpoint of these models"):
        load_model(path)


def test_mismatched_keys_are_listed(ref_sdetr: RefSDETR) -> None:
    state = dict(ref_sdetr.state_dict())
    del state["class_embed.bias"]
    state["mytransformer2.extra.weight"] = torch.zeros(1)
    state["query_embed2.weight"] = torch.zeros(100, 128)
    with pytest.raises(CheckpointError) as info:
        load_model(state)
    message = str(info.value)
    assert "1 missing" in message and "class_embed.bias" in message
    assert "1 unexpected" in message and "stage2.extra.weight" in message
    assert "mis-shaped" in message and "stage2.query_embed.weight" in message


def test_namespace_args_are_read(ref_sdetr: RefSDETR, tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save(original_checkpoint(ref_sdetr, nheads=8, dilation=False, dropout=0.0), path)
    assert load_model(path).config.dropout == 0.0
    assert isinstance(original_checkpoint(ref_sdetr)["args"], argparse.Namespace)


def test_a_checkpoint_with_a_bad_stored_config_names_the_file_and_field(tmp_path: Path) -> None:
    """Issue 11: a checkpoint that stored ``norm_first='false'`` loaded as True."""
    model = build_model("sdetr-tiny", num_classes=4)
    path = save_model(model, tmp_path / "c.pth")
    payload = torch.load(path, weights_only=True)
    payload["config"]["norm_first"] = "false"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"c\.pth: its stored model config .*norm_first: expected true or false"):
        load_model(path)


def test_each_kind_of_bad_checkpoint_file_gets_its_own_message(tmp_path: Path) -> None:
    """Issue 11: random bytes were reported as 'contains Python objects'; a folder as missing."""
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"random\.pth: not a PyTorch checkpoint \(a file starting with b'\\x00"):
        load_model(tmp_path / "random.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a PyTorch checkpoint \(an empty file"):
        load_model(tmp_path / "empty.pth")
    (tmp_path / "run").mkdir()
    with pytest.raises(
        CheckpointError, match=r"run is a folder; pass the checkpoint file in it \(e\.g\. .*checkpoint\.pth\)"
    ):
        load_model(tmp_path / "run")
    torch.save({"model": {}, "payload": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(
        CheckpointError, match=r"evil\.pth: refused to load - it contains Python objects .*; it refers to print\."
    ):
        load_model(tmp_path / "evil.pth")
    torch.save({"sdetr_format": 1, "config": {}}, tmp_path / "no_model.pth")
    with pytest.raises(CheckpointError, match=r"no_model\.pth: an sdetr checkpoint without a 'model' state dict"):
        load_model(tmp_path / "no_model.pth")
    torch.save({"sdetr_format": 1, "model": {}, "config": [1]}, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match=r"no_config\.pth: an sdetr checkpoint without its 'config' dict"):
        load_model(tmp_path / "no_config.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: holds a list, not a checkpoint dict"):
        load_model(tmp_path / "list.pth")


def test_imagenet_weights_of_another_depth_are_refused_naming_the_backbone(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"not a torchvision resnet10 ImageNet state dict \(torchvision has no"):
        build_model("sdetr-tiny", backbone_width=1.0, backbone_stem="resnet", backbone_weights=str(path))
    same_depth = build_model(
        "sdetr-tiny",
        backbone="resnet18",
        backbone_norm="frozen_bn",
        backbone_width=1.0,
        backbone_stem="resnet",
        backbone_weights=str(path),
    )
    assert same_depth.config.backbone == "resnet18"  # the file itself is fine
