"""Make the README's figures (``python docs/make_figures.py``); writes docs/qkva_grid.png."""

from __future__ import annotations

from pathlib import Path

import torch

from analysis import plot_qkva
from sdetr import build_model, normalize_image, record
from sdetr.data import synthetic_image


def main() -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny").eval()
    image = synthetic_image(256, 384, seed=3, shapes=5)
    site = "stage2.encoder.1.self_attn"
    with torch.no_grad(), record(model, sites=site, dtype=torch.float32) as rec:
        model([normalize_image(image)])
    figure = plot_qkva(rec[site], image, query_cell=(8, 12))
    out = Path(__file__).with_name("qkva_grid.png")
    figure.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
