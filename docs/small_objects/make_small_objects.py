"""Make the README's *Small objects* figures and tables from a trained checkpoint.

``python docs/small_objects/make_small_objects.py --checkpoint outputs/checkpoint.pth
--data-root ~/.cache/sdetr/synthetic-... --out docs/small_objects`` writes four PNGs (AP per size
bin for every decoder output, AP per class, TIDE errors overall and on small objects, one
validation image with small objects) and prints the tables as markdown. The size, class and error
breakdowns read the trainer's ``detections_val.json`` (``--detections``; by default the file next
to the checkpoint), the per-output breakdown runs the model over the validation split with the
trainer's batch size, so its final row is the trainer's evaluation.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from analysis.breakdowns import class_breakdown, size_breakdown, stage_breakdown
from analysis.detection_plots import plot_class_breakdown, plot_detections, plot_error_breakdown, plot_size_breakdown
from analysis.error_breakdown import error_breakdown
from analysis.writers import markdown_table
from sdetr import CocoDetection, CocoPaths, atomic_path, build_transforms, load_model

DPI = 100
VIEWER_DPI = 80  # the viewer is a photo-like image: fewer pixels keep its PNG small
SMALL_AREA = 32.0**2


def save(figure: Figure, path: Path, dpi: int = DPI) -> None:
    """Write a small PNG atomically (``sdetr.atomic_path``): rendered at ``dpi``, reduced to a
    256-colour palette, without date metadata (the same inputs give the same bytes)."""
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=dpi)
    rendered.seek(0)
    with Image.open(rendered) as image, atomic_path(path) as temporary:
        image.convert("RGB").quantize(256).save(temporary, format="png", optimize=True)
    print(f"wrote {path}")


def viewer(dataset: CocoDetection, detections: list[dict[str, Any]]) -> tuple[Figure, int, int]:
    """The validation image with the most small objects (COCO's ``area`` < 32^2), with its detections."""
    coco = dataset.coco
    small = {i: sum(a["area"] < SMALL_AREA and not a.get("iscrowd", 0) for a in coco.imgToAnns[i]) for i in dataset.ids}
    image_id = max(dataset.ids, key=lambda i: (small[i], -i))  # most small objects, lowest id on a tie
    annotations = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
    mine = [d for d in detections if d["image_id"] == image_id]
    found = {
        "boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4),
        "scores": np.array([d["score"] for d in mine]),
        "labels": np.array([d["category_id"] for d in mine]),
    }
    figure = plot_detections(
        np.asarray(dataset.read_image(image_id)),  # [H, W, 3] uint8, original pixels
        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],  # [N, 4] xyxy
        found,
        gt_labels=[a["category_id"] for a in annotations],
        score_threshold=0.3,
        category_names={c["id"]: c["name"] for c in coco.dataset["categories"]},
    )
    return figure, image_id, small[image_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint (train.py's output)")
    parser.add_argument("--data-root", type=Path, required=True, help="COCO-layout folder with val2017/, annotations/")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNGs")
    parser.add_argument("--detections", type=Path, help="COCO results (default: detections_val.json by the checkpoint)")
    parser.add_argument("--scale", default="synthetic", help="validation transforms: synthetic, full, ...")
    parser.add_argument("--batch-size", type=int, default=4, help="the trainer's batch size (padding depends on it)")
    args = parser.parse_args()
    detections_path = args.detections or args.checkpoint.parent / "detections_val.json"
    if not detections_path.is_file():
        raise SystemExit(f"--detections {detections_path} does not exist; pass the trainer's detections_val.json")
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = CocoDetection(CocoPaths(args.data_root, "val"), build_transforms(args.scale, False))
    detections = json.loads(detections_path.read_text())
    gt = dataset.coco

    sizes = size_breakdown(gt, detections)
    print("## size_breakdown\n" + markdown_table(sizes.drop(columns=["kind", "lo", "hi", "note"])))
    for area in ("all", "small"):
        classes = class_breakdown(gt, detections, area=area)
        print(f"\n## class_breakdown area={area}\n" + markdown_table(classes.drop(columns=["category_id", "area"])))
        if area == "all":
            save(plot_class_breakdown(classes), args.out / "class_breakdown.png")
    errors = error_breakdown(gt, detections, area=("all", "small"))
    print("\n## error_breakdown\n" + markdown_table(errors))
    save(plot_error_breakdown(errors), args.out / "error_breakdown.png")

    model = load_model(args.checkpoint)
    stages = stage_breakdown(model, dataset, batch_size=args.batch_size)
    table = stages.pivot(index=["output", "site"], columns="bin", values="AP")[list(dict.fromkeys(stages["bin"]))]
    print("\n## stage_breakdown AP\n" + markdown_table(table.reset_index()))
    table = stages.pivot(index=["output", "site"], columns="bin", values="AR100")[list(dict.fromkeys(stages["bin"]))]
    print("\n## stage_breakdown AR100\n" + markdown_table(table.reset_index()))
    save(plot_size_breakdown(stages), args.out / "stage_breakdown.png")
    final = stages[stages["is_final"]].reset_index(drop=True)
    columns = ["n_gt", "AP", "AP50", "AP75", "AR100"]
    same = final[columns].equals(sizes[columns])
    print(f"\nfinal decoder output == size_breakdown of {detections_path.name}: {same}")
    print(f"final output AP (all) = {final.loc[final['bin'] == 'all', 'AP'].item()!r}")

    figure, image_id, count = viewer(dataset, detections)
    save(figure, args.out / "detections_small.png", VIEWER_DPI)
    print(f"viewer: image {image_id} ({dataset.coco.imgs[image_id]['file_name']}), {count} small objects")


if __name__ == "__main__":
    main()
