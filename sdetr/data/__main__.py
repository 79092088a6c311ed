"""``python -m sdetr.data``: generate the synthetic COCO-layout dataset and print its folder."""

from __future__ import annotations

import argparse
import sys

from sdetr.data.synthetic import SyntheticSpec, generate_synthetic_coco
from sdetr.errors import USER_ERROR_EXIT, UserError


def main(argv: list[str] | None = None) -> int:
    """Generate the set; returns the exit status (2 for bad options, printed as one line)."""
    parser = argparse.ArgumentParser(description="Generate the synthetic COCO-layout dataset.")
    defaults = SyntheticSpec()
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--num_train", type=int, default=defaults.num_train)
    parser.add_argument("--num_val", type=int, default=defaults.num_val)
    parser.add_argument("--max_objects", type=int, default=defaults.max_objects)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--any_colour",
        action="store_true",
        help="fill shapes with any colour instead of their class's hue band (harder: class only from outline)",
    )
    parser.add_argument("--cache_dir", default=None, help="default: $SDETR_CACHE or ~/.cache/sdetr")
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(
            args.height,
            args.width,
            args.num_train,
            args.num_val,
            args.max_objects,
            defaults.min_side,
            args.seed,
            class_hues=not args.any_colour,
        )
        print(generate_synthetic_coco(spec, args.cache_dir))
    except (UserError, PermissionError, NotADirectoryError) as error:
        print(f"python -m sdetr.data: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
