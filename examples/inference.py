"""Demo: build every preset, run inference, save and reload a checkpoint (no download, CPU).

Run with ``python examples/inference.py`` (after ``make setup``). Weights are random
unless ``--checkpoint`` points at a trained SDETR/DETR file, so detections are meaningless
without one; the demo shows the API, the shapes, speed and the checkpoint round trip.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdetr import PRESETS, build_model, count_parameters, load_model, normalize_image, postprocess, save_model
from sdetr.data import synthetic_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="an sdetr, original SDETR or DETR checkpoint file")
    parser.add_argument("--output_dir", default="outputs/inference")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = parser.parse_args()
    torch.manual_seed(0)
    out_dir = Path(args.output_dir)

    height, width = args.size
    print(f"preset             trainable params   forward (1 image, {height}x{width})")
    image = normalize_image(synthetic_image(*args.size))
    summary = {}
    for name in PRESETS:
        model = build_model(name).eval()
        with torch.no_grad():
            model([image])  # warm-up
            start = time.perf_counter()
            model([image])
            seconds = time.perf_counter() - start
        summary[name] = {"parameters": count_parameters(model), "forward_s": round(seconds, 3)}
        print(f"{name:<18} {count_parameters(model):>16,}   {seconds * 1000:8.0f} ms")

    model = load_model(args.checkpoint) if args.checkpoint else build_model("sdetr-tiny").eval()
    second = normalize_image(synthetic_image(320, 400, seed=1))
    with torch.no_grad():
        outputs = model([image, second])  # two sizes: padded into one batch with a mask
    print(
        f"\n{model.config.name}: pred_logits {tuple(outputs['pred_logits'].shape)}, "
        f"pred_boxes {tuple(outputs['pred_boxes'].shape)}, {len(outputs['aux_outputs'])} aux outputs"
    )
    detections = postprocess(outputs, torch.tensor([list(args.size), [320, 400]]))
    top = detections[0]["scores"].topk(3)
    for score, index in zip(top.values, top.indices, strict=True):
        box = [round(v, 1) for v in detections[0]["boxes"][index].tolist()]
        print(f"  query {int(index):3d}: label {int(detections[0]['labels'][index])}, score {score:.3f}, box {box}")

    path = save_model(model, out_dir / "model.pth")
    reloaded = load_model(path)
    with torch.no_grad():
        same = torch.equal(reloaded([image, second])["pred_boxes"], outputs["pred_boxes"])
    print(f"\nsaved {path} and reloaded it: identical outputs = {same}")
    (out_dir / "summary.json").write_text(json.dumps({"presets": summary, "reload_identical": same}, indent=2))
    if not same:
        raise SystemExit("reloaded model gave different outputs")


if __name__ == "__main__":
    main()
