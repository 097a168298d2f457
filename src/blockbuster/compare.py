"""Object-level agreement between two label images: a reference and a result.

Two objects *match* when their IoU exceeds ``thresh`` (0.5: then each object has at most one
partner, so there is no assignment problem). Used by :func:`blockbuster.preview_tiling`
(tiled against untiled segmentation of the same window), ``overlap="auto"``, and the
benchmarks (a model against the ground truth, tiled against whole-image prediction).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["compare", "disagreement"]


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (label in a, label in b) pairs over voxels foreground in either, with counts."""
    a = np.asarray(a).ravel().astype(np.int64)
    b = np.asarray(b).ravel().astype(np.int64)
    keep = (a > 0) | (b > 0)
    key = a[keep] * (int(b.max()) + 1) + b[keep]
    uniq, counts = np.unique(key, return_counts=True)
    return uniq // (int(b.max()) + 1), uniq % (int(b.max()) + 1), counts


def compare(reference: np.ndarray, labels: np.ndarray, thresh: float = 0.5) -> dict[str, Any]:
    """How well ``labels`` reproduces ``reference``, object by object and voxel by voxel.

    Returns
    -------
    dict
        ``f1`` (objects matched at IoU > thresh), ``n_ref``, ``n_out``, ``matched``,
        ``fused`` (objects of ``labels`` that hold the largest part of two or more reference
        objects), ``split`` (reference objects that hold the largest part of two or more objects
        of ``labels``), ``voxels_one_to_one`` (fraction of the voxels that are foreground in
        either image whose two labels are a matched pair), ``mean_iou`` of matched pairs.

    Examples
    --------
    >>> ref = np.zeros((6, 6), int); ref[:3] = 1; ref[3:] = 2
    >>> out = ref.copy(); out[5, :] = 3                       # object 2 loses a row to object 3
    >>> r = compare(ref, out)
    >>> r["f1"], r["split"], r["fused"], round(r["voxels_one_to_one"], 3)
    (0.8, 1, 0, 0.833)
    """
    ra, lb, n = _pairs(reference, labels)
    size_a = np.bincount(ra, weights=n, minlength=1)
    size_b = np.bincount(lb, weights=n, minlength=1)
    fg = (ra > 0) & (lb > 0)
    iou = n[fg] / (size_a[ra[fg]] + size_b[lb[fg]] - n[fg])
    match = iou > thresh
    n_ref = int(np.count_nonzero(size_a[1:]))
    n_out = int(np.count_nonzero(size_b[1:]))
    tp = int(match.sum())
    f1 = 2 * tp / (n_ref + n_out) if n_ref + n_out else 1.0
    # largest partner of each object (background included), to count fusions and splits
    fused = _many_to_one(ra, lb, n, majority_of="ref")
    split = _many_to_one(ra, lb, n, majority_of="out")
    agree = n[fg][match].sum()
    return {"f1": f1, "n_ref": n_ref, "n_out": n_out, "matched": tp, "fused": fused,
            "split": split, "voxels_one_to_one": float(agree / n.sum()) if n.sum() else 1.0,
            "mean_iou": float(iou[match].mean()) if tp else 0.0}


def _many_to_one(ra: np.ndarray, lb: np.ndarray, n: np.ndarray, majority_of: str) -> int:
    """Objects on one side that are the largest partner of two or more on the other side."""
    src, dst = (ra, lb) if majority_of == "ref" else (lb, ra)
    order = np.lexsort((-n, src))  # by source object, largest overlap first
    first = np.ones(len(order), bool)
    first[1:] = src[order][1:] != src[order][:-1]
    best = dst[order][first & (src[order] > 0)]
    best = best[best > 0]
    return int(np.count_nonzero(np.bincount(best) > 1)) if best.size else 0


def disagreement(reference: np.ndarray, labels: np.ndarray, thresh: float = 0.5) -> np.ndarray:
    """Where ``labels`` and ``reference`` disagree: voxels foreground in either whose two
    labels are not a matched pair (IoU > ``thresh``).

    Examples
    --------
    >>> ref = np.array([[1, 1, 0, 2, 2]])
    >>> disagreement(ref, np.array([[3, 3, 0, 4, 5]])).astype(int).tolist()
    [[0, 0, 0, 1, 1]]
    """
    ref = np.asarray(reference).astype(np.int64)
    lab = np.asarray(labels).astype(np.int64)
    ra, lb, n = _pairs(ref, lab)
    size_a = np.bincount(ra, weights=n, minlength=1)
    size_b = np.bincount(lb, weights=n, minlength=1)
    fg = (ra > 0) & (lb > 0)
    iou = np.zeros(len(n))
    iou[fg] = n[fg] / (size_a[ra[fg]] + size_b[lb[fg]] - n[fg])
    good = iou > thresh
    width = int(lab.max()) + 1
    good_keys = ra[good] * width + lb[good]
    key = ref * width + lab
    return ((ref > 0) | (lab > 0)) & ~np.isin(key, good_keys)
