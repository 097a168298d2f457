"""Make docs/images/preview-tiling.png and the figures of the README's preview section.

On the demo's image (synthetic nuclei, ``blockbuster demo``) and its segmenter (the built-in
watershed, diameter 12): a preview with too little overlap (the PNG), the overlap
``overlap="auto"`` chooses and its curve, and the seam reports of two whole runs (too little
overlap, and the chosen one).

Run: python docs/make_preview_figure.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from blockbuster import choose_overlap, preview_tiling, run_report, tile_process
from blockbuster.data import synthetic_nuclei
from blockbuster.plugins.catalog import make_segmenter

HERE = Path(__file__).parent
SHAPE, TILE, DIAMETER = (2048, 2048), (256, 256), 12.0


def main() -> None:
    image, _ = synthetic_nuclei(SHAPE, diameter=DIAMETER, density=0.5, seed=0)
    method = make_segmenter("watershed", {"diameter": DIAMETER})
    png = HERE / "images" / "preview-tiling.png"
    check = preview_tiling(image, method, tile_shape=TILE, overlap=2, png=png)
    with Image.open(png) as picture:  # 256 colours: a third of the size, for the repository
        picture.quantize(256, dither=Image.Dither.NONE).save(png, optimize=True)
    f = check.figures
    print(f"preview, overlap 2, window {check.window}: F1 {f['f1']:.3f}, {f['fused']} fused, "
          f"{f['split']} split, {100 * f['voxels_one_to_one']:.2f}% voxels agree "
          f"({check.seconds['tiled']:.1f} s tiled, {check.seconds['untiled']:.1f} s untiled)")
    choice = choose_overlap(image, method, tile_shape=TILE)
    print(f"\noverlap auto on {choice.window}: chose {tuple(choice.chosen)}"
          f" (found: {choice.found})\n")
    print("| overlap | F1 | fused | split | voxels agree | seams |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in choice.curve:
        print(f"| {c['overlap'][0]} | {c['f1']:.3f} | {c['fused']} | {c['split']} | "
              f"{100 * c['voxels_one_to_one']:.2f}% | {c['seams']} |")
    print("\nseam reports of whole runs (2048 x 2048, 64 tiles):\n")
    print("| overlap | verdict | axis | orphans at borders | orphans at controls (drawn, next "
          "to faces) | ambiguous at borders | ambiguous at controls |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for overlap in (2, choice.chosen[0]):
            out = tile_process(image, method, TILE, overlap, output=Path(tmp) / f"{overlap}.zarr",
                               progress=False)
            seams = run_report(out).seams
            assert seams is not None
            for ax in seams["axes"]:
                s, c, f = ax["seam"], ax["control"], ax["near_border"]
                print(f"| {overlap} | {seams['verdict']} | {ax['axis']} | "
                      f"{s['orphans']}/{s['objects']} ({100 * s['orphan_rate']:.1f}%) | "
                      f"{100 * c['orphan_rate']:.1f}%, {100 * f['orphan_rate']:.1f}% | "
                      f"{100 * s['ambiguous_rate']:.1f}% | {100 * c['ambiguous_rate']:.1f}%, "
                      f"{100 * f['ambiguous_rate']:.1f}% |")


if __name__ == "__main__":
    main()
