"""Memory a recording would hold, per preset, input size and selection (estimates, no forward).

Usage: ``python benchmarks/recording_memory.py`` prints the README's markdown table.
"""

from __future__ import annotations

from sdetr import build_model, estimate_bytes
from sdetr.instrument.recorder import Selection, format_bytes

ROWS: list[tuple[str, str | list[str], Selection]] = [
    ("all encoder sites, q k v a", "*.encoder.*", Selection()),
    ("stage-2 encoder, a only", "stage2.encoder.*", Selection(tensors=("a",))),
    (
        "stage-2 encoder, a for 16 query pixels",
        "stage2.encoder.*",
        Selection(tensors=("a",), query_pixels=((0.0, 0.0),) * 16),
    ),
    ("stage-1 encoder, a, 1 head", "stage1.encoder.*", Selection(tensors=("a",), heads=(0,))),
    ("all decoder sites, q k v a", "*.decoder.*", Selection()),
    ("everything", "*", Selection()),
]


def main() -> None:
    sizes = [(800, 1333), (512, 683)]
    print("| preset | selection (float16, batch 1) | " + " | ".join(f"{h}x{w}" for h, w in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for preset in ("sdetr", "sdetr-multihead", "detr"):
        model = build_model(preset)
        for label, pattern, selection in ROWS:
            if preset == "detr" and "stage-2" in label:
                continue
            cells = [format_bytes(sum(estimate_bytes(model, size, 1, pattern, selection).values())) for size in sizes]
            print(f"| `{preset}` | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
