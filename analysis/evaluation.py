"""Detections of a model on a COCO-layout dataset, scored with pycocotools' COCOeval.

Everything that reports AP in ``analysis`` goes through :func:`detect` and :func:`evaluate`,
which reuse ``sdetr``'s post-processing, results conversion and ``coco_stats`` (COCOeval):
no matching is re-implemented here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from analysis.batches import DataSource, count_images, iter_batches
from sdetr import STAT_NAMES, CocoDetection, Detector, coco_stats, postprocess, to_coco_results

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@contextmanager
def eval_mode(model: ModuleT) -> Iterator[ModuleT]:
    """``model`` in eval mode (dropout off) inside the block; its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


#: Index of the final prediction among a model's decoder outputs (``-1``: the last layer).
FINAL = -1


@dataclass
class Detections:
    """COCO results per decoder output of one pass over a dataset.

    Attributes:
        results: output index (0 = first decoder layer of stage 1, ..., ``L - 1`` = the final
            prediction) -> list of COCO results entries (``image_id``, ``category_id``,
            ``bbox`` xywh in original pixels, ``score``).
        image_ids: the images seen, in order.
    """

    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    image_ids: list[int] = field(default_factory=list)


def decoder_outputs(outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """All decoder outputs of a forward in order: ``aux_outputs`` then the final prediction."""
    final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    return [*outputs.get("aux_outputs", []), final]


@torch.no_grad()
def detect(
    model: Detector,
    data: DataSource,
    batch_size: int = 2,
    outputs: Sequence[int] = (FINAL,),
    limit: int | None = None,
    progress: bool = True,
    desc: str = "detect",
) -> Detections:
    """Run ``model`` (as it is: eval mode, gates attached by the caller) over ``data`` with targets.

    Args:
        data: a ``CocoDetection`` or batches with targets carrying ``image_id`` and ``orig_size``.
        outputs: which decoder outputs to convert (indices into :func:`decoder_outputs`; -1 = final).
        limit: at most this many images.
    """
    found = Detections()
    device = next(model.parameters()).device
    total = count_images(data, limit)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for batch in iter_batches(data, batch_size, limit):
            if batch.targets is None:
                raise ValueError(
                    "detect needs targets (image_id, orig_size): pass a CocoDetection or (images, targets)"
                )
            out = model([image.to(device) for image in batch.images])
            per_output = decoder_outputs(out)
            sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in batch.targets]).to(device)
            ids = [int(t["image_id"]) for t in batch.targets]
            for index in outputs:
                chosen = per_output[index]
                key = index % len(per_output)
                found.results.setdefault(key, []).extend(to_coco_results(postprocess(chosen, sizes), ids))
            found.image_ids.extend(ids)
            bar.update(len(batch.images))
    return found


def evaluate(
    model: Detector,
    dataset: CocoDetection,
    batch_size: int = 2,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """COCO's 12 bbox stats (``AP``, ``AP50``, ..., ``ARl``) of the model's final prediction on ``dataset``."""
    found = detect(model, dataset, batch_size, (FINAL,), limit, progress, desc)
    results = next(iter(found.results.values()), [])
    stats = coco_stats(dataset.coco, results, found.image_ids)
    return dict(zip(STAT_NAMES, stats, strict=True))
