from __future__ import annotations

import colorsys
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdetr.config import ConfigError
from sdetr.data import BadDataError, SyntheticSpec, generate_synthetic_coco, load_coco, synthetic_image
from sdetr.data.__main__ import main as generate_command
from sdetr.data.synthetic import CLASS_HUES, CLASSES, HUE_SPREAD, WRITES_IN_FLIGHT, fill_colour, render_scene


def test_synthetic_image_deterministic_and_in_range() -> None:
    a, b = synthetic_image(64, 96, seed=5), synthetic_image(64, 96, seed=5)
    assert a.shape == (3, 64, 96) and torch.equal(a, b)
    assert not torch.equal(a, synthetic_image(64, 96, seed=6))
    assert a.min() >= 0 and a.max() <= 1


def test_dataset_loads_through_pycocotools_and_covers_coco_size_ranges(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_train=80, num_val=10, seed=3)
    root = generate_synthetic_coco(spec, tmp_path)
    coco = load_coco(root / "annotations" / "instances_train2017.json")
    assert len(coco.imgs) == 80 and len(coco.cats) == 4
    areas = np.array([ann["area"] for ann in coco.anns.values()])
    small, large = (areas < 32**2).sum(), (areas > 96**2).sum()
    medium = len(areas) - small - large
    assert small >= 10 and medium >= 10 and large >= 3, (small, medium, large)
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        info = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"]
        assert ann["area"] <= w * h
    assert len(list((root / "train2017").glob("*.png"))) == 80


def test_deterministic_and_cached(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_train=6, num_val=2, seed=9)
    first = generate_synthetic_coco(spec, tmp_path / "a")
    second = generate_synthetic_coco(spec, tmp_path / "b")
    text = (first / "annotations" / "instances_train2017.json").read_text()
    assert text == (second / "annotations" / "instances_train2017.json").read_text()
    stamp = (first / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    assert generate_synthetic_coco(spec, tmp_path / "a") == first  # reused, not regenerated
    assert (first / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp
    other = generate_synthetic_coco(SyntheticSpec(num_train=6, num_val=2, seed=10), tmp_path / "a")
    assert other != first and json.loads(text) != json.loads(
        (other / "annotations" / "instances_train2017.json").read_text()
    )
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no half-built folders


def test_files_are_the_scenes_rendered_in_order_whatever_the_writer_thread(tmp_path: Path) -> None:
    """The background writer saves each scene under its own name: the same bytes as rendering and
    saving one after the other from the split's seed."""
    spec = SyntheticSpec(num_train=2 * WRITES_IN_FLIGHT + 3, num_val=2, seed=4)
    root = generate_synthetic_coco(spec, tmp_path)
    rng = np.random.default_rng(spec.seed)
    for index in range(spec.num_train):
        image, _ = render_scene(rng, spec)
        expected = io.BytesIO()
        image.save(expected, format="png")
        assert (root / "train2017" / f"{index:06d}.png").read_bytes() == expected.getvalue(), index


def test_a_failed_image_write_stops_generation_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Image.Image.save
    saved: list[object] = []

    def failing(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        saved.append(fp)
        original(self, fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError, match="No space left on device"):
        generate_synthetic_coco(SyntheticSpec(num_train=12, num_val=2, seed=4), tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its half-built folder


def test_generator_command(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    generate_command(
        ["--num_train", "3", "--num_val", "2", "--height", "96", "--width", "128", "--cache_dir", str(tmp_path)]
    )
    root = Path(capsys.readouterr().out.strip())
    assert load_coco(root / "annotations" / "instances_val2017.json").imgs[1]["width"] == 128


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), kind=st.integers(0, len(CLASSES) - 1))
def test_class_hues_put_each_class_in_its_own_hue_band(seed: int, kind: int) -> None:
    red, green, blue = fill_colour(np.random.default_rng(seed), kind, class_hues=True)
    hue, saturation, value = colorsys.rgb_to_hsv(red / 255, green / 255, blue / 255)
    distance = abs((hue - CLASS_HUES[kind] + 0.5) % 1.0 - 0.5)  # on the hue circle
    assert distance <= HUE_SPREAD + 0.01 and saturation >= 0.69 and value >= 0.69
    others = [abs((hue - CLASS_HUES[k] + 0.5) % 1.0 - 0.5) for k in range(len(CLASSES)) if k != kind]
    assert min(others) > distance  # nearer its own band than any other class's


def test_any_colour_is_a_different_set(tmp_path: Path) -> None:
    hues = SyntheticSpec(num_train=4, num_val=2)
    any_colour = SyntheticSpec(num_train=4, num_val=2, class_hues=False)
    assert hues.key() != any_colour.key()
    first = generate_synthetic_coco(hues, tmp_path) / "train2017" / "000000.png"
    second = generate_synthetic_coco(any_colour, tmp_path) / "train2017" / "000000.png"
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_train", "-3"], "num_train=-3: use a positive integer"),
        (["--num_val", "0"], "num_val=0: use a positive integer"),
        (["--height", "8"], "height=8, width=256: images need at least 32 pixels"),
        (["--max_objects", "0"], "max_objects=0: use a positive integer"),
        (["--seed", "-1"], "seed=-1: use 0 or more"),
    ],
)
def test_generator_command_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Issue 11: ``--num_train -3`` built a folder; ``--height 8`` and ``--max_objects 0`` failed inside numpy."""
    assert generate_command([*argv, "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m sdetr.data: error: SyntheticSpec ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_spec_fields_are_type_checked() -> None:
    with pytest.raises(ConfigError, match=r"height: expected an integer, got 64\.5"):
        SyntheticSpec(height=64.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="class_hues: expected true or false, got 'no'"):
        SyntheticSpec(class_hues="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_side=100: objects cannot be larger than 3/4"):
        SyntheticSpec(height=64, width=96, min_side=100)


def test_a_damaged_cache_folder_is_a_clear_error(tmp_path: Path) -> None:
    spec = SyntheticSpec(height=64, width=96, num_train=2, num_val=1)
    root = generate_synthetic_coco(spec, tmp_path)
    (root / "annotations" / "instances_train2017.json").write_text("{trunc")
    with pytest.raises(
        BadDataError, match=rf"cached synthetic set {root} is incomplete or damaged .*delete that folder"
    ):
        generate_synthetic_coco(spec, tmp_path)
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(BadDataError, match="incomplete or damaged"):
        generate_synthetic_coco(spec, tmp_path)
