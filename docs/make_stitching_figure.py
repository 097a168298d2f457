"""Make docs/images/stitching.png: one tile corner of dense nuclei, stitched three ways.

Run: python docs/make_stitching_figure.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from blockbuster import tile_process
from blockbuster.data import synthetic_nuclei
from blockbuster.preview import save_preview

HERE = Path(__file__).parent
TILE, OVERLAP = (96, 96), 16


class Segment:
    """Global threshold + distance-transform watershed: splits touching nuclei."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return segment(tile, self.threshold)


def segment(tile: np.ndarray, threshold: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(tile.astype(np.float32), 1.5)
    mask = smooth > threshold
    dist = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=4, threshold_abs=2, exclude_border=False,
                           labels=ndimage.label(mask)[0])
    markers = np.zeros(tile.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def main() -> None:
    from skimage.filters import threshold_otsu

    image, _ = synthetic_nuclei((288, 288), diameter=14, density=0.7, touching=True, seed=5)
    fn = Segment(threshold_otsu(ndimage.gaussian_filter(image.astype(np.float32), 1.5)))
    window = (slice(40, 152), slice(40, 152))  # around the corner of four tiles at (96, 96)
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "no stitching: cells cut at the border": dict(overlap=0, stitch="none"),
            'stitch="faces": touching cells fused': dict(overlap=0, stitch="faces"),
            f'stitch="iou", overlap={OVERLAP}: seamless': dict(overlap=OVERLAP, stitch="iou"),
        }
        for i, (caption, kwargs) in enumerate(runs.items()):
            labels = tile_process(image, fn, TILE, progress=False,
                                  output=Path(tmp) / f"{i}.zarr", **kwargs)
            png = save_preview(image, labels, Path(tmp) / f"{i}.png", tile_grid=labels.chunks,
                               window=window, max_size=336, fill_alpha=0.35)
            panel = Image.open(png).convert("RGB")
            panels.append((caption, panel.resize((panel.width * 3, panel.height * 3),
                                                 Image.Resampling.NEAREST)))
    font = ImageFont.load_default(size=16)
    width = sum(p.width for _, p in panels) + 24 * (len(panels) - 1)
    height = max(p.height for _, p in panels) + 36
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    x = 0
    for caption, panel in panels:
        figure.paste(panel, (x, 36))
        draw.text((x + 4, 8), caption, fill="black", font=font)
        x += panel.width + 24
    out = HERE / "images" / "stitching.png"
    figure.save(out)
    print(out)


if __name__ == "__main__":
    main()
