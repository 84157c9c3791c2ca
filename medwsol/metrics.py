"""Localization and classification metrics (numpy only).

The dataset-level metrics follow the protocol of Choe et al., CVPR 2020
("Evaluating weakly supervised object localization methods right", code:
``clovaai/wsolevaluation``); the per-image F1 scores follow Belharbi et al.
(TMI 2022). Everything here takes numpy arrays; torch tensors work too (they go
through ``np.asarray``, so move them to the CPU first).

Conventions, fixed once for the whole project:

* **Threshold grid.** ``PixelPR(n_bins)`` evaluates the thresholds
  ``t_k = k / n_bins`` for ``k = 0 .. n_bins - 1`` (0, 0.001, ..., 0.999 for the
  default 1000), each computed in float64 as ``np.arange(n_bins) / n_bins``. A
  pixel is predicted positive at threshold ``t`` when ``score >= t``; the
  comparison is made in the score's own floating dtype (float32 maps compare
  against ``float32(t)``, like ``score >= t`` does in NumPy 2), so a map already
  quantised to the grid lands exactly in its bin. Scores are clipped to [0, 1]
  first; NaN is an error.
* **PxAP** additionally uses the threshold 1.0 (pixels with score exactly 1),
  as wsolevaluation's ``MaskEvaluator`` does with its extra ``[1, 2)`` bin, and
  then sums ``precision_k * (recall_k - recall_{k+1})`` over thresholds in
  descending order, skipping thresholds with no predicted positive (where the
  recall step is 0 anyway). This is exactly scikit-learn's
  ``average_precision_score`` for maps whose values lie on the grid. PxAP is
  returned as a fraction in [0, 1]; wsolevaluation prints it times 100.
* **Undefined ratios.** When a ratio's denominator is 0 (nothing predicted and
  nothing in the ground truth for that class), F1/Dice/IoU are 1.0 (perfect
  agreement on an empty set; this is scikit-learn's ``zero_division=1.0``) and
  precision is 1.0 (scikit-learn's end point of the PR curve). Recall with no
  positive pixel at all is NaN, and ``pxap`` raises.
* **Ground truth** may be bool, integer (non-zero = foreground, e.g. instance
  ids) or float with values in {0, 1}; anything else is rejected rather than
  guessed at. An optional ``ignore`` mask removes pixels from every count.

Example:
    >>> import numpy as np
    >>> from medwsol.metrics import PixelPR, PerImageF1
    >>> rng = np.random.default_rng(0)
    >>> gt = np.zeros((32, 32), bool); gt[8:24, 8:24] = True
    >>> score = np.clip(gt * 0.7 + rng.random((32, 32)) * 0.3, 0, 1)
    >>> pr = PixelPR(n_bins=1000)
    >>> pr.update(score, gt)
    >>> round(pr.pxap(), 3)
    1.0
    >>> tau, miou = pr.best_threshold("miou")
    >>> per_image = PerImageF1(threshold=tau)
    >>> per_image.update(score, gt)["f1_neg"]
    1.0
    >>> per_image.result()["f1_pos"]
    1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medwsol.errors import DataError

__all__ = [
    "PixelPR",
    "PerImageF1",
    "f1_scores",
    "iou",
    "boundary_f1",
    "classification_error",
    "seam_ratio",
    "CRITERIA",
]

#: Criteria accepted by :meth:`PixelPR.best_threshold`.
CRITERIA = ("miou", "iou_fg", "iou_bg", "dice_fg", "dice_bg", "mdice")


# --------------------------------------------------------------------------- helpers


def _ratio(num: np.ndarray | float, den: np.ndarray | float, empty: float) -> np.ndarray:
    """``num / den`` in float64 with ``empty`` where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(empty), dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _as_bool(x: Any, name: str) -> np.ndarray:
    """A mask as a bool array: bool as is, integers ``!= 0``, floats must be in {0, 1}."""
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return a != 0
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.isin(a, (0.0, 1.0)).all():
            bad = a[~np.isin(a, (0.0, 1.0))].ravel()[0]
            raise DataError(
                f"{name} must be binary but holds the value {bad!r}; "
                f"fix: threshold it first (e.g. {name} >= tau) or pass a bool array"
            )
        return a != 0
    raise DataError(f"{name} has dtype {a.dtype}; fix: pass a bool, integer or {{0, 1}} float array")


def _as_scores(x: Any) -> np.ndarray:
    """Scores as float32/float64, clipped to [0, 1]; NaN is rejected."""
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    if np.isnan(a).any():
        raise DataError(
            f"score map holds {int(np.isnan(a).sum())} NaN value(s); "
            "fix: check the model output (a NaN loss?) or fill no-data pixels before scoring"
        )
    return np.clip(a, 0.0, 1.0)


def _same_size(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Check that two arrays describe the same pixels; squeeze singleton axes if needed."""
    if a.shape == b.shape:
        return a, b
    if a.squeeze().shape == b.squeeze().shape:
        return a.squeeze(), b.squeeze()
    raise DataError(
        f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; "
        "fix: resize the map to the mask's size (nearest for masks) before scoring"
    )


def _pixel_counts(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of two bool arrays of the same shape, optionally without ``ignore``."""
    if ignore is not None:
        keep = ~ignore
        pred, gt = pred[keep], gt[keep]
    n = pred.size
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    tp = int(np.count_nonzero(pred & gt))
    fp = n_pred - tp
    fn = n_gt - tp
    tn = n - tp - fp - fn
    return tp, fp, fn, tn


def _prepare_pair(pred: Any, gt: Any, ignore: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    p, g = _same_size(p, g, ("pred", "gt"))
    ig = None
    if ignore is not None:
        ig = _as_bool(ignore, "ignore")
        ig, g = _same_size(ig, g, ("ignore", "gt"))
    return p, g, ig


# --------------------------------------------------------------------------- dataset level


class PixelPR:
    """Streaming pixel precision-recall accumulator over a whole image set.

    Keeps two integer histograms (scores of ground-truth positive and negative
    pixels) with bins ``[t_k, t_{k+1})`` for the thresholds ``t_k = k / n_bins``
    plus one bin for scores exactly 1.0; memory is ``O(n_bins)`` whatever the
    number of pixels, and counts are int64 (no overflow below ~9e18 pixels).

    Args:
        n_bins: number of thresholds in [0, 1); 1000 gives the protocol's step of 0.001.

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import PixelPR
        >>> pr = PixelPR(n_bins=10)
        >>> pr.update(np.array([0.05, 0.45, 0.65, 0.95]), np.array([False, False, True, True]))
        >>> pr.pxap()
        1.0
        >>> pr.best_threshold("miou")
        (0.5, 1.0)
        >>> pr.dice_at(0.5)
        (1.0, 1.0)
    """

    def __init__(self, n_bins: int = 1000) -> None:
        n_bins = int(n_bins)
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        # edges[k] = k / n_bins, k = 0..n_bins; edges[n_bins] == 1.0 exactly.
        self._edges64 = np.arange(n_bins + 1, dtype=np.float64) / n_bins
        self._edges32 = self._edges64.astype(np.float32)
        # row 0: ground-truth negative pixels, row 1: ground-truth positive pixels;
        # column k < n_bins: scores in [t_k, t_{k+1}); column n_bins: scores == 1.0.
        self._hist = np.zeros((2, n_bins + 1), dtype=np.int64)

    # ------------------------------------------------------------------ accumulate

    def update(self, score_map: Any, gt_mask: Any, ignore: Any = None) -> None:
        """Add the pixels of one image (or of a batch: every pixel is pooled).

        Args:
            score_map: scores, any shape; clipped to [0, 1]; NaN raises ``DataError``.
            gt_mask: ground truth with the same number of pixels (bool, integer
                non-zero, or {0, 1} float). Singleton axes may differ (``[1, H, W]`` vs ``[H, W]``).
            ignore: optional mask of pixels to leave out of every count.
        """
        scores = _as_scores(score_map)
        gt = _as_bool(gt_mask, "gt_mask")
        scores, gt = _same_size(scores, gt, ("score_map", "gt_mask"))
        edges = self._edges32 if scores.dtype == np.float32 else self._edges64
        # bin k such that edges[k] <= s < edges[k+1]; s == 1.0 goes to bin n_bins
        idx = np.searchsorted(edges, scores.ravel(), side="right") - 1
        code = idx + (self.n_bins + 1) * gt.ravel().astype(np.int64)
        if ignore is not None:
            ig = _as_bool(ignore, "ignore")
            ig, _ = _same_size(ig, gt, ("ignore", "gt_mask"))
            code = code[~ig.ravel()]
        counts = np.bincount(code, minlength=2 * (self.n_bins + 1))
        self._hist += counts.reshape(2, self.n_bins + 1).astype(np.int64)

    def merge(self, other: PixelPR) -> PixelPR:
        """Add another accumulator's counts to this one (e.g. from another worker); returns ``self``."""
        if not isinstance(other, PixelPR) or other.n_bins != self.n_bins:
            got = getattr(other, "n_bins", type(other).__name__)
            raise ValueError(f"cannot merge PixelPR(n_bins={self.n_bins}) with {got}; use the same n_bins")
        self._hist += other._hist
        return self

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self._hist[:] = 0

    # ------------------------------------------------------------------ raw counts

    @property
    def thresholds(self) -> np.ndarray:
        """The thresholds ``k / n_bins``, ``k = 0 .. n_bins - 1`` (float64, ascending)."""
        return self._edges64[:-1].copy()

    @property
    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the (negative, positive) score histograms, ``n_bins + 1`` bins each."""
        return self._hist[0].copy(), self._hist[1].copy()

    @property
    def n_pixels(self) -> int:
        """Number of pixels accumulated (ignored ones excluded)."""
        return int(self._hist.sum())

    @property
    def n_positive(self) -> int:
        """Number of ground-truth foreground pixels accumulated."""
        return int(self._hist[1].sum())

    def _confusion_full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Counts at the ``n_bins + 1`` thresholds ``0, 1/n, ..., 1`` (ascending)."""
        neg, pos = self._hist
        tp = np.cumsum(pos[::-1])[::-1]  # pixels of class 1 with score >= t_k
        fp = np.cumsum(neg[::-1])[::-1]
        fn = pos.sum() - tp
        tn = neg.sum() - fp
        return tp, fp, fn, tn

    def confusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixel counts ``(tp, fp, fn, tn)`` at each of :attr:`thresholds` (int64 arrays)."""
        return tuple(a[:-1].copy() for a in self._confusion_full())  # type: ignore[return-value]

    def _index(self, tau: float) -> int:
        k = int(round(float(tau) * self.n_bins))
        if not 0 <= k <= self.n_bins or abs(k / self.n_bins - float(tau)) > 1e-9:
            raise ValueError(
                f"threshold {tau!r} is not on the grid k/{self.n_bins} in [0, 1]; "
                f"fix: use a value from .thresholds (or 1.0), or build PixelPR with a finer n_bins"
            )
        return k

    def confusion_at(self, tau: float) -> tuple[int, int, int, int]:
        """Pixel counts ``(tp, fp, fn, tn)`` at one grid threshold ``tau`` (``k / n_bins``, 1.0 allowed)."""
        k = self._index(tau)
        return tuple(int(a[k]) for a in self._confusion_full())  # type: ignore[return-value]

    # ------------------------------------------------------------------ curves

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel precision and recall at each of :attr:`thresholds`.

        Returns:
            ``(precision, recall)``, float64 arrays of length ``n_bins``. Precision is
            1.0 where nothing is predicted; recall is NaN when no positive pixel was seen.
        """
        tp, fp, fn, _ = self.confusion()
        precision = _ratio(tp, tp + fp, 1.0)
        recall = _ratio(tp, tp + fn, np.nan)
        return precision, recall

    def pxap(self) -> float:
        """PxAP: area under the pixel precision-recall curve (wsolevaluation's formula).

        Returns:
            A fraction in [0, 1] (the paper's tables print 100 times this).

        Raises:
            DataError: no positive ground-truth pixel (or no pixel at all) was seen.
        """
        tp, fp, fn, _ = self._confusion_full()
        n_pos = int(self._hist[1].sum())
        if n_pos == 0:
            raise DataError(
                "PxAP is undefined: the evaluated set has no foreground pixel; "
                "fix: evaluate on images with pixel masks that contain the object"
            )
        # descending thresholds: 1.0, (n-1)/n, ..., 0; the virtual threshold above 1 has recall 0
        tp, fp = tp[::-1].astype(np.float64), fp[::-1].astype(np.float64)
        recall = tp / n_pos
        predicted = (tp + fp) > 0
        precision = _ratio(tp, tp + fp, 0.0)
        d_recall = np.diff(recall, prepend=0.0)
        return float(np.sum((precision * d_recall)[predicted]))

    def iou_per_threshold(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Foreground IoU, background IoU and their mean (mIoU) at each of :attr:`thresholds`."""
        tp, fp, fn, tn = self.confusion()
        iou_fg = _ratio(tp, tp + fp + fn, 1.0)
        iou_bg = _ratio(tn, tn + fp + fn, 1.0)
        return iou_fg, iou_bg, (iou_fg + iou_bg) / 2.0

    def dice_per_threshold(self) -> tuple[np.ndarray, np.ndarray]:
        """Dataset-level Dice (F1) of the foreground and of the background at each threshold."""
        tp, fp, fn, tn = self.confusion()
        return _ratio(2 * tp, 2 * tp + fp + fn, 1.0), _ratio(2 * tn, 2 * tn + fp + fn, 1.0)

    def best_threshold(self, criterion: str = "miou") -> tuple[float, float]:
        """The threshold that maximises ``criterion`` over :attr:`thresholds`.

        Ties go to the lowest threshold (first ``argmax``).

        Args:
            criterion: one of ``CRITERIA``: ``"miou"`` (protocol default), ``"iou_fg"``,
                ``"iou_bg"``, ``"dice_fg"``, ``"dice_bg"``, ``"mdice"`` (mean of the two Dice).

        Returns:
            ``(tau, value)`` as Python floats.
        """
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.n_pixels == 0:
            raise DataError("no pixel accumulated; fix: call update() with the pixel-labelled images first")
        if criterion in ("miou", "iou_fg", "iou_bg"):
            fg, bg, mean = self.iou_per_threshold()
        else:
            fg, bg = self.dice_per_threshold()
            mean = (fg + bg) / 2.0
        curve = {"miou": mean, "mdice": mean, "iou_fg": fg, "dice_fg": fg, "iou_bg": bg, "dice_bg": bg}[criterion]
        k = int(np.argmax(curve))
        return float(self.thresholds[k]), float(curve[k])

    # ------------------------------------------------------------------ at one threshold

    def dice_at(self, tau: float) -> tuple[float, float]:
        """Dataset-level Dice of foreground and background at ``tau`` (pixel counts pooled over the set)."""
        tp, fp, fn, tn = self.confusion_at(tau)
        return float(_ratio(2 * tp, 2 * tp + fp + fn, 1.0)), float(_ratio(2 * tn, 2 * tn + fp + fn, 1.0))

    def iou_at(self, tau: float) -> tuple[float, float, float]:
        """Dataset-level ``(iou_fg, iou_bg, miou)`` at ``tau``."""
        tp, fp, fn, tn = self.confusion_at(tau)
        fg = float(_ratio(tp, tp + fp + fn, 1.0))
        bg = float(_ratio(tn, tn + fp + fn, 1.0))
        return fg, bg, (fg + bg) / 2.0

    def __repr__(self) -> str:
        return f"PixelPR(n_bins={self.n_bins}, n_pixels={self.n_pixels}, n_positive={self.n_positive})"


# --------------------------------------------------------------------------- per image


def f1_scores(pred: Any, gt: Any, ignore: Any = None) -> tuple[float, float]:
    """F1 (Dice) of the foreground and of the background of one image.

    ``F1+ = 2 tp / (2 tp + fp + fn)`` and ``F1- = 2 tn / (2 tn + fn + fp)``. When a
    class is absent from both ``pred`` and ``gt`` its F1 is 1.0 (e.g. both masks
    empty gives ``F1+ = 1``), as scikit-learn's ``f1_score(..., zero_division=1.0)``.

    Args:
        pred: predicted mask (bool; see the module docstring for other dtypes).
        gt: ground-truth mask of the same size.
        ignore: optional mask of pixels to leave out.

    Returns:
        ``(f1_pos, f1_neg)`` as floats in [0, 1].

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import f1_scores
        >>> gt = np.array([[1, 1, 0, 0]], bool)
        >>> f1_scores(np.ones_like(gt), gt)  # the all-ones baseline: F1- is 0
        (0.6666666666666666, 0.0)
    """
    tp, fp, fn, tn = _pixel_counts(*_prepare_pair(pred, gt, ignore))
    return float(_ratio(2 * tp, 2 * tp + fp + fn, 1.0)), float(_ratio(2 * tn, 2 * tn + fp + fn, 1.0))


def iou(pred: Any, gt: Any, ignore: Any = None) -> float:
    """Foreground IoU (Jaccard) of one image; 1.0 when both masks are empty.

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import iou
        >>> iou(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool))
        0.3333333333333333
    """
    tp, fp, fn, _ = _pixel_counts(*_prepare_pair(pred, gt, ignore))
    return float(_ratio(tp, tp + fp + fn, 1.0))


class PerImageF1:
    """Mean over images of F1+, F1-, foreground IoU and mIoU at a fixed threshold (Belharbi's protocol).

    Args:
        threshold: a pixel is foreground when ``score >= threshold``.

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import PerImageF1
        >>> m = PerImageF1(threshold=0.5)
        >>> _ = m.update(np.array([[0.9, 0.2]]), np.array([[True, False]]))
        >>> _ = m.update(np.array([[0.9, 0.9]]), np.array([[True, False]]))
        >>> r = m.result()
        >>> r["n_images"], r["f1_pos"], r["f1_neg"]
        (2, 0.8333333333333333, 0.5)
    """

    KEYS = ("f1_pos", "f1_neg", "iou", "iou_bg", "miou")

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.values: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self.names: list[str | None] = []

    def update(self, score_map: Any, gt_mask: Any, ignore: Any = None, name: str | None = None) -> dict[str, float]:
        """Score one image (its map is thresholded at ``self.threshold``); returns its values."""
        pred = _as_scores(score_map) >= self.threshold
        return self.update_binary(pred, gt_mask, ignore=ignore, name=name)

    def update_binary(self, pred: Any, gt_mask: Any, ignore: Any = None, name: str | None = None) -> dict[str, float]:
        """Score one image from an already binary prediction; returns its values."""
        tp, fp, fn, tn = _pixel_counts(*_prepare_pair(pred, gt_mask, ignore))
        fg = float(_ratio(tp, tp + fp + fn, 1.0))
        bg = float(_ratio(tn, tn + fp + fn, 1.0))
        row = {
            "f1_pos": float(_ratio(2 * tp, 2 * tp + fp + fn, 1.0)),
            "f1_neg": float(_ratio(2 * tn, 2 * tn + fp + fn, 1.0)),
            "iou": fg,
            "iou_bg": bg,
            "miou": (fg + bg) / 2.0,
        }
        for k, v in row.items():
            self.values[k].append(v)
        self.names.append(name)
        return row

    def update_batch(self, score_maps: Any, gt_masks: Any, names: list[str] | None = None) -> None:
        """Score every image of a batch (first axis), e.g. ``[B, 1, H, W]`` maps and masks."""
        maps, masks = np.asarray(score_maps), np.asarray(gt_masks)
        if len(maps) != len(masks):
            raise DataError(f"batch of {len(maps)} maps but {len(masks)} masks; fix: pass matching batches")
        for i in range(len(maps)):
            self.update(maps[i], masks[i], name=None if names is None else names[i])

    def merge(self, other: PerImageF1) -> PerImageF1:
        """Append another accumulator's images (same threshold required); returns ``self``."""
        if other.threshold != self.threshold:
            raise ValueError(f"cannot merge thresholds {self.threshold} and {other.threshold}")
        for k in self.KEYS:
            self.values[k].extend(other.values[k])
        self.names.extend(other.names)
        return self

    @property
    def n_images(self) -> int:
        """Number of images scored."""
        return len(self.names)

    def _mean(self, key: str) -> float:
        v = self.values[key]
        return float(np.mean(v)) if v else float("nan")

    @property
    def f1_pos(self) -> float:
        """Mean foreground F1 over the images (NaN when none)."""
        return self._mean("f1_pos")

    @property
    def f1_neg(self) -> float:
        """Mean background F1 over the images (NaN when none)."""
        return self._mean("f1_neg")

    @property
    def iou(self) -> float:
        """Mean foreground IoU over the images (NaN when none)."""
        return self._mean("iou")

    @property
    def miou(self) -> float:
        """Mean over the images of the per-image mIoU (NaN when none)."""
        return self._mean("miou")

    def result(self) -> dict[str, float]:
        """Means over images: ``f1_pos``, ``f1_neg``, ``iou``, ``iou_bg``, ``miou`` and ``n_images``.

        The means are NaN when no image was scored.
        """
        out: dict[str, Any] = {k: self._mean(k) for k in self.KEYS}
        out["n_images"] = self.n_images
        return out


# --------------------------------------------------------------------------- boundaries


def boundary_f1(pred: Any, gt: Any, tolerance: float = 2) -> float:
    """Boundary F1 with a pixel tolerance (BSDS-style boundary F-measure).

    Boundaries are the ``mode="inner"`` pixels of
    ``skimage.segmentation.find_boundaries`` (object pixels touching the
    background; the image border is not a boundary). A predicted boundary pixel
    is correct when a ground-truth boundary pixel lies within Euclidean distance
    ``tolerance`` (``scipy.ndimage.distance_transform_edt``), and vice versa for
    recall.

    Returns:
        The F1 of boundary precision and recall; 1.0 when neither mask has a
        boundary, 0.0 when only one of them has.

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import boundary_f1
        >>> a = np.zeros((20, 20), bool); a[5:15, 5:15] = True
        >>> boundary_f1(a, np.roll(a, 1, axis=1), tolerance=2)
        1.0
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.segmentation import find_boundaries

    p, g, _ = _prepare_pair(pred, gt)
    bp = find_boundaries(p, mode="inner")
    bg = find_boundaries(g, mode="inner")
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    dist_to_g = distance_transform_edt(~bg)
    dist_to_p = distance_transform_edt(~bp)
    precision = float(np.count_nonzero(dist_to_g[bp] <= tolerance)) / n_p
    recall = float(np.count_nonzero(dist_to_p[bg] <= tolerance)) / n_g
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- classification


def classification_error(y_true: Any, y_pred: Any) -> float:
    """Classification error in percent.

    Args:
        y_true: integer labels, shape ``[N]``.
        y_pred: predicted labels ``[N]``, or scores/logits ``[N, C]`` (argmax over ``C``).

    Example:
        >>> from medwsol.metrics import classification_error
        >>> classification_error([0, 1, 1, 0], [0, 1, 0, 0])
        25.0
    """
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    p = p.ravel()
    if t.size == 0 or t.shape != p.shape:
        raise DataError(
            f"classification_error needs as many predictions as labels, got {p.shape} and {t.shape}; "
            "fix: pass one prediction per image"
        )
    return float(100.0 * np.count_nonzero(t != p) / t.size)


def seam_ratio(heat: Any, coverage: Any, boxes: Any) -> dict[str, float]:
    """How much a stitched heatmap jumps at tile edges compared with inside tiles.

    For every pair of 4-neighbour heatmap pixels that are both covered, the step is ``|h(p) - h(q)|``.
    A pair *straddles a tile edge* when some tile's left/right (or top/bottom) border runs between
    the two pixels, within that tile's extent. The seam ratio is the mean step over straddling pairs
    divided by the mean step over all other pairs: ~1 for a seamless map, >> 1 for a checkerboard
    (maps rescaled tile by tile).

    Args:
        heat: ``[H, W]`` heatmap.
        coverage: ``[H, W]`` bool, pixels covered by at least one tile (None: all).
        boxes: int ``[N, 4]`` tile footprints ``(r0, c0, r1, c1)`` in heatmap pixels (end exclusive).

    Returns:
        ``{"seam_ratio", "edge_step", "inside_step", "n_edge_pairs", "n_inside_pairs"}``
        (``seam_ratio`` is NaN when either set of pairs is empty or inside steps are all 0).

    Example:
        >>> import numpy as np
        >>> from medwsol.metrics import seam_ratio
        >>> heat = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (4, 1))
        >>> heat[:, 4:] += 0.5                      # a jump at column 4, where two tiles meet
        >>> round(seam_ratio(heat, None, [(0, 0, 4, 4), (0, 4, 4, 8)])["seam_ratio"], 2)
        9.0
    """
    h = np.asarray(heat, dtype=np.float64)
    H, W = h.shape
    cov = np.ones((H, W), bool) if coverage is None else np.asarray(coverage, bool)
    edge_v = np.zeros((H, W + 1), bool)  # edge_v[r, c]: a tile border between columns c-1 and c
    edge_h = np.zeros((H + 1, W), bool)  # edge_h[r, c]: a tile border between rows r-1 and r
    for r0, c0, r1, c1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        r0, r1, c0, c1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
        if r1 <= r0 or c1 <= c0:
            continue
        edge_v[r0:r1, c0] = True
        edge_v[r0:r1, c1] = True
        edge_h[r0, c0:c1] = True
        edge_h[r1, c0:c1] = True
    step_x = np.abs(np.diff(h, axis=1))  # pairs (r, c-1)-(r, c) for c = 1..W-1
    ok_x = cov[:, 1:] & cov[:, :-1]
    on_x = edge_v[:, 1:W]
    step_y = np.abs(np.diff(h, axis=0))
    ok_y = cov[1:, :] & cov[:-1, :]
    on_y = edge_h[1:H, :]
    edge = np.concatenate([step_x[ok_x & on_x], step_y[ok_y & on_y]])
    inside = np.concatenate([step_x[ok_x & ~on_x], step_y[ok_y & ~on_y]])
    e = float(edge.mean()) if edge.size else float("nan")
    i = float(inside.mean()) if inside.size else float("nan")
    ratio = e / i if edge.size and inside.size and i > 0 else float("nan")
    return {"seam_ratio": ratio, "edge_step": e, "inside_step": i, "n_edge_pairs": int(edge.size),
            "n_inside_pairs": int(inside.size)}
