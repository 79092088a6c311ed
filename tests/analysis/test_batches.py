"""``iter_batches``: every accepted data form gives the same images, in order, in bounded batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from analysis.batches import boxes_in_pixels, count_images, iter_batches
from sdetr import CocoDetection, CocoPaths, SyntheticSpec, build_transforms, collate, generate_synthetic_coco


def _images(n: int) -> list[torch.Tensor]:
    return [torch.full((3, 8 + i, 10), float(i)) for i in range(n)]


def test_sequence_is_grouped_in_order() -> None:
    batches = list(iter_batches(_images(5), batch_size=2))
    assert [len(b.images) for b in batches] == [2, 2, 1]
    assert [int(img[0, 0, 0]) for b in batches for img in b.images] == [0, 1, 2, 3, 4]
    assert all(b.targets is None for b in batches)
    assert [len(b.images) for b in iter_batches(_images(5), batch_size=2, limit=3)] == [2, 1]
    assert count_images(_images(5)) == 5 and count_images(_images(5), limit=3) == 3


def test_tensor_batch_is_split_into_images() -> None:
    batches = list(iter_batches(torch.zeros(3, 3, 8, 8), batch_size=2))
    assert [len(b.images) for b in batches] == [2, 1]
    assert batches[0].images[0].shape == (3, 8, 8)


def test_bad_images_are_named() -> None:
    with pytest.raises(ValueError, match=r"image 1: expected a \[3, H, W\]"):
        list(iter_batches([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)]))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(_images(2), batch_size=0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    cache = tmp_path_factory.mktemp("cache")
    spec = SyntheticSpec(height=64, width=96, num_train=2, num_val=5, min_side=8)
    root = generate_synthetic_coco(spec, cache_dir=cache)
    return CocoDetection(CocoPaths(root, "val"), build_transforms("synthetic", False))


def test_dataset_and_loader_give_the_same_batches(dataset: CocoDetection) -> None:
    direct = list(iter_batches(dataset, batch_size=2))
    loader = list(iter_batches(DataLoader(dataset, batch_size=2, collate_fn=collate)))
    assert [len(b.images) for b in direct] == [2, 2, 1] == [len(b.images) for b in loader]
    for a, b in zip(direct, loader, strict=True):
        assert a.targets is not None and b.targets is not None
        assert [t["image_id"] for t in a.targets] == [t["image_id"] for t in b.targets]
        for x, y in zip(a.images, b.images, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert len(list(iter_batches(DataLoader(dataset, batch_size=2, collate_fn=collate), limit=3))[-1].images) == 1
    assert count_images(dataset) == 5 and count_images(DataLoader(dataset, batch_size=2, collate_fn=collate)) == 5


def test_boxes_in_pixels_is_the_inverse_of_normalised_cxcywh() -> None:
    target = {"boxes": torch.tensor([[0.5, 0.25, 0.5, 0.5]]), "size": torch.tensor([40, 80])}
    # cx 40, cy 10, w 40, h 20 pixels on an 80-wide, 40-high image
    torch.testing.assert_close(boxes_in_pixels(target), torch.tensor([[20.0, 0.0, 60.0, 20.0]]))


def test_loader_of_plain_image_lists() -> None:
    """A DataLoader of plain image lists (no targets) is accepted as it comes."""
    loader = DataLoader(_images(3), batch_size=2, collate_fn=list)
    assert [len(b.images) for b in iter_batches(loader)] == [2, 1]
