"""The format table: one synthetic nuclei image written in every layout blockbuster reads,
segmented by the default method through each reader; prints a Markdown table.

The same pixels must give the same objects in every container (same threshold, same labels):
the ``objects`` and ``threshold`` columns show it. Channels, time points and singleton axes are
added around the nuclei as each format usually stores them, and the nuclei channel is chosen by
name (or index where the format has no names).

    PYTHONPATH=src python benchmarks/bench_formats.py [--side 1024] [--quick]

Also writes ``benchmarks/out/bench_formats.md`` and ``.json`` for ``collect.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def layouts(folder: Path, image: np.ndarray) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(label, path, open_image options)`` of the image in every layout."""
    import h5py
    import tensorstore as ts
    import tifffile
    import zarr
    from test_readers import write_bdv, write_bioformats2raw, write_imaris, write_ome_zarr

    empty = np.zeros_like(image)
    two = np.stack([empty, image])  # the nuclei are channel 1, "DAPI"
    out: list[tuple[str, Any, dict[str, Any]]] = []
    out.append(("numpy array", image, {}))
    for chunks in [(128, 128), (300, 77)]:
        arr = zarr.create_array(str(folder / f"c{chunks[0]}.zarr"), shape=image.shape,
                                chunks=chunks, dtype=image.dtype)
        arr[:] = image
        out.append((f"zarr v3, chunks {chunks}", folder / f"c{chunks[0]}.zarr", {}))
    v2 = zarr.create_array(str(folder / "v2.zarr"), shape=image.shape, chunks=(256, 256),
                           dtype=image.dtype, zarr_format=2,
                           chunk_key_encoding={"name": "v2", "separator": "/"})
    v2[:] = image
    out.append(("zarr v2, dimension_separator /", folder / "v2.zarr", {}))
    for version in ("0.4", "0.5"):
        path = write_ome_zarr(folder / f"img{version}.ome.zarr", two, "cyx", version,
                              scale={"y": 0.5, "x": 0.5}, names=["empty", "DAPI"])
        out.append((f"OME-Zarr {version} (CYX)", path, {"channels": "DAPI"}))
    frames = np.stack([image, image, image])
    out.append(("OME-Zarr 0.4, time series (TYX), t=1",
                write_ome_zarr(folder / "t.ome.zarr", frames, "tyx", "0.4",
                               scale={"t": 10.0, "y": 0.5, "x": 0.5}), {"time_point": 1}))
    out.append(("bioformats2raw root (TCZYX 1,1,1,Y,X)",
                write_bioformats2raw(folder / "b2r.zarr", [image[None, None, None]], [None]),
                {}))
    tifffile.imwrite(folder / "cyx.ome.tif", two, ome=True, tile=(256, 256), metadata={
        "axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
        "Channel": {"Name": ["empty", "DAPI"]}})
    out.append(("OME-TIFF (CYX)", folder / "cyx.ome.tif", {"channels": "DAPI"}))
    tifffile.imwrite(folder / "ij.tif", two[None], imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZCYX", "unit": "um"})
    out.append(("ImageJ hyperstack (ZCYX, Z=1)", folder / "ij.tif", {"channels": 1}))
    tifffile.imwrite(folder / "plain.tif", image)
    out.append(("plain TIFF", folder / "plain.tif", {}))
    with h5py.File(folder / "plain.h5", "w") as f:
        f.create_dataset("raw", data=image, chunks=(200, 200))
    out.append(("HDF5, one dataset", folder / "plain.h5", {}))
    bdv = folder / "bdv"
    bdv.mkdir()
    out.append(("BigDataViewer .xml/.h5 (T,setups,Z=1)",
                write_bdv(bdv, two[None, :, None], ["empty", "DAPI"], (1.0, 0.5, 0.5)),
                {"channels": "DAPI"}))
    out.append(("Imaris .ims (T,C,Z=1)",
                write_imaris(folder / "img.ims", two[None, :, None], ["empty", "DAPI"],
                             (1.0, 0.5, 0.5), (0.0, 0.0, 0.0)), {"channels": "DAPI"}))
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file",
                                                 "path": str(folder / "img.n5")},
                     "metadata": {"dimensions": list(image.shape[::-1]),
                                  "blockSize": [128, 128], "dataType": "uint16",
                                  "compression": {"type": "gzip"}}, "create": True}).result()
    store[...] = image.T
    out.append(("N5 (TensorStore)", folder / "img.n5", {}))
    try:
        from pylibCZIrw import czi as pyczi

        with pyczi.create_czi(str(folder / "img.czi"), exist_ok=True) as czi:
            for c in range(2):
                czi.write(data=two[c], plane={"C": c, "T": 0, "Z": 0})
            czi.write_metadata(document_name="img", channel_names={0: "empty", 1: "DAPI"},
                               scale_x=0.5e-6, scale_y=0.5e-6)
        out.append(("CZI (bioio-czi)", folder / "img.czi", {"channels": "DAPI"}))
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a 384 x 384 image (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.side = 384
    from blockbuster import open_image, tile_process
    from blockbuster.data import synthetic_nuclei
    from blockbuster.plugins.watershed import WatershedSegmenter

    image = synthetic_nuclei((args.side, args.side), diameter=12, seed=7)[0]
    lines = ["| layout | reader / format | stored axes | tiled | voxel size | objects | "
             "threshold | s |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, where, options in layouts(folder, image):
            t = options.pop("time_point", None)
            src = open_image(where, **options)
            if t is not None:
                src = src.time_point(t)
            seg = WatershedSegmenter(diameter=12)
            start = time.perf_counter()
            out = tile_process(src, seg, (384, 384), progress=False,
                               output=folder / f"out{abs(hash(name))}.zarr")
            elapsed = time.perf_counter() - start
            scale = ", ".join(f"{s:g}" for s in src.spatial_scale)
            unit = src.spatial_units[-1] or "voxel"
            lines.append(f"| {name} | {src.meta.reader} / {src.meta.format} | "
                         f"{','.join(src.axis_names)} {src.shape} | "
                         f"{','.join(src.axes[a].name for a in src.tiled_axes)} | "
                         f"{scale} {unit} | {out.attrs['blockbuster']['n_labels']} | "
                         f"{seg.statistics['threshold']:.1f} | {elapsed:.1f} |")
            print(lines[-1], flush=True)
    from _common import report

    command = "python benchmarks/bench_formats.py" + (" --quick" if args.quick else
                                                      f" --side {args.side}")
    report("bench_formats", "Formats", {"": "\n".join(lines)},
           [f"{args.side} x {args.side} synthetic nuclei (diameter 12), 384 x 384 tiles, the "
            "watershed segmenter; 'objects' and 'threshold' must be the same in every row."],
           {"rows": lines[2:]}, command)


if __name__ == "__main__":
    main()
