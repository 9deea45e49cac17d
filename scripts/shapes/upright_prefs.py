#!/usr/bin/env python3
"""Writes a copy of prefs_centered.parquet with both images of every pair turned upright.

The preference-data counterpart of upright.py (docs/SHAPES.md, "Upright shapes"): each image
is turned as upright.py turns the pretraining images, with its rotation and centre taken from
prefs_centered_meta.parquet (`rotation_k`, `cx_k`, `cy_k` per `ranking_id`). Labels, captions
and every other column are kept: turning an image about its centre moves no centroid, so the
`centred` preference is unchanged.

    python3 scripts/shapes/upright_prefs.py ../shared/shapes/prefs_centered.parquet \\
        ../shared/shapes/prefs_centered_meta.parquet <out.parquet>

Needs pyarrow and pillow.
"""
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from upright import turn_upright


def main(src, meta, dst):
    table = pq.read_table(src)
    geometry = {r["ranking_id"]: r for r in pq.read_table(meta).to_pylist()}
    rows = table.select(["ranking_id", "jpg_0", "jpg_1"]).to_pylist()
    for k in (0, 1):
        images = []
        for r in rows:
            g = geometry[r["ranking_id"]]
            images.append(turn_upright(r[f"jpg_{k}"], g[f"rotation_{k}"], g[f"cx_{k}"], g[f"cy_{k}"]))
        table = table.set_column(table.schema.get_field_index(f"jpg_{k}"), f"jpg_{k}", pa.array(images, pa.binary()))
    pq.write_table(table, dst)
    print(f"{dst}: {len(rows)} pairs turned upright")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
