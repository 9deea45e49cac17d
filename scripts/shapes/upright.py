#!/usr/bin/env python3
"""Writes a copy of a shapes-world parquet with every shape turned back to rotation 0.

Stage `upright` of scripts/train_shapes.sh (why: docs/SHAPES.md, "Upright shapes"). Each image
is rotated about its shape's centre (`cx`, `cy`) by minus its `rotation` (degrees clockwise on
screen), bicubic, the uncovered corners filled with the flat background; `rotation` becomes 0
and every other column is kept. score.py reads colour, shape and background right on all of
the first 120 rewritten images.

    python3 scripts/shapes/upright.py ../shared/shapes/pretrain.parquet <out.parquet>

Needs pyarrow and pillow.
"""
import io
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def turn_upright(data, rotation, cx, cy):
    """One encoded image with its shape turned back to rotation 0 about (cx, cy), re-encoded in
    its own format (JPEG at quality 95)."""
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    im = im.convert("RGB")
    if rotation:
        # Every shape sits at least 1 px inside the image, so a corner pixel is background.
        # PIL turns counter-clockwise, which undoes the world's clockwise rotation.
        im = im.rotate(rotation, resample=Image.BICUBIC, center=(cx, cy), fillcolor=im.getpixel((0, 0)))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def main(src, dst):
    table = pq.read_table(src)
    rows = table.select(["image", "rotation", "cx", "cy"]).to_pylist()
    images = [turn_upright(r["image"], r["rotation"], r["cx"], r["cy"]) for r in rows]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    table = table.set_column(table.schema.get_field_index("rotation"), "rotation",
                             pa.array([0.0] * len(rows), pa.float64()))
    pq.write_table(table, dst)
    print(f"{dst}: {len(rows)} images turned upright")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
