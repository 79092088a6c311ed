from __future__ import annotations

import pytest

from sdetr import build_model, sites
from sdetr.instrument.catalog import select_sites


def test_sdetr_sites() -> None:
    infos = {info.name: info for info in sites(build_model("sdetr"))}
    assert len(infos) == 18
    enc2 = infos["stage2.encoder.0.self_attn"]
    assert (enc2.kind, enc2.heads, enc2.head_dim, enc2.stride) == ("encoder_self", 1, 256, 16)
    enc1 = infos["stage1.encoder.2.self_attn"]
    assert (enc1.kind, enc1.heads, enc1.head_dim, enc1.stride) == ("encoder_self", 8, 32, 32)
    assert infos["stage1.decoder.1.cross_attn"].kind == "decoder_cross"
    assert infos["stage2.decoder.2.self_attn"].stride is None


def test_detr_sites_are_stage1_only() -> None:
    names = [info.name for info in sites(build_model("detr"))]
    assert len(names) == 18 and all(name.startswith("stage1.") for name in names)
    assert "stage1.encoder.5.self_attn" in names and "stage1.decoder.5.cross_attn" in names


def test_select_by_glob_and_list() -> None:
    model = build_model("sdetr-tiny")
    assert list(select_sites(model, "stage2.encoder.*")) == ["stage2.encoder.0.self_attn", "stage2.encoder.1.self_attn"]
    assert len(select_sites(model, ["*.cross_attn", "stage1.encoder.0.self_attn"])) == 5
    with pytest.raises(KeyError, match=r"matches no attention site; available: stage1\.encoder\.0\.self_attn"):
        select_sites(model, "stage3.*")
