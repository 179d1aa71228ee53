"""EdgeBoxes region proposals (section 3: "We adopt EdgeBox for region proposal generation").

Zitnick and Dollar's EdgeBoxes (ECCV 2014) through OpenCV contrib (`cv2.ximgproc.createEdgeBoxes`).
EdgeBoxes scores sliding windows by the edge contours they wholly enclose; it needs an edge map
(float32 in [0, 1], thinned by non-maximum suppression) and an edge orientation map. Two sources:

- `edge_model=PATH`: OpenCV's structured-edge random forest, the paper's setting: `detectEdges`,
  `computeOrientation`, `edgesNms` with the radius EdgeBoxes' authors use (r = 2). The file is not
  shipped with this project: it is `testdata/cv/ximgproc/model.yml.gz` of the opencv_extra
  repository (OpenCV's conversion of the authors' BSDS500 model).
- `edge_model=None` (default, no file): an edge map from image gradients, see `gradient_edges`;
  orientation as OpenCV's `computeOrientation` defines it (`compute_orientation`); thinning along
  the orientation as OpenCV's `edgesNms` does it (`edge_nms`), which OpenCV exposes only on a
  structured-edge object and so only with a model file.

Decisions (figures from benchmarks/proposals.py on one core, synthetic-set images resized
to 500x375, and from the synthetic set itself):
- Gradient edges respond to texture that the structured forest ignores, and the cv2 box search
  slows with texture: with a 1 px blur 7.6% of the pixels stayed edges and an image took 187 ms,
  with 2 px (`edge_sigma`) 4.2% and 40 ms (all else at the defaults). Gradients are mapped to
  [0, 1) with a fixed, image-independent scale (`edge_scale`: a blank image has no edges, scores
  compare across images); 30 grey levels per px keeps steps of ~16 grey levels (after the blur's
  spreading) above cv2's `edge_min_mag`.
- `cluster_min_mag` 3 (cv2: 0.5): an image with a large checkered object, cut into many small
  edge groups, took 2.5 s with 1, 0.16 s with 2, 0.05 s with 3; recall stayed within the noise
  of the synthetic sets (IoU 0.5: 1.0 throughout).
- Boxes are returned as continuous pixel coordinates: cv2 reports the search window's first edge
  column + 1 (the Matlab original's 1-based pixels) and a width from its first to its last edge
  column, so the window covers pixels x - 1 .. x - 1 + w, i.e. [x - 1, x + w).

Threads and determinism: the cv2 box search is single-threaded and deterministic (given a fresh
cv2 object per image, see `EdgeBoxes.__call__`); the filters before it may use OpenCV's thread
pool but compute every pixel independently, so results depend neither on the thread count nor on
the images seen before. A caller running one proposer per core (the sharding actors) may call
`cv2.setNumThreads(1)`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from rgnn.boxes import box_iou
from rgnn.scales import BIN_NAMES, area_bin

# computeOrientation smooths with the forest's gradientNormalizationRadius, 4 in OpenCV's model.
ORIENTATION_RADIUS = 4
# edgesNms as edgeBoxes.m calls it on structured edges: radius 2, no border suppression, m = 1.
MODEL_NMS_RADIUS = 2
# edge_nms's tolerance: keep a pixel within 1% of its neighbours' maximum (Dollar's edgesDetect).
NMS_MULTIPLIER = 1.01


@dataclass(frozen=True)
class ProposalParams:
    """EdgeBoxes settings: cv2.ximgproc.createEdgeBoxes's twelve (in its order), then the
    gradient edge map's three (used only without a model file).

    Defaults suit classification (many boxes, high recall): cv2's, except `max_boxes` 1000
    (cv2: 10000), `cluster_min_mag` 3 (cv2: 0.5, see the module docstring) and `min_box_area`
    200 px^2 (cv2: 1000) so that objects down to ~14 px get boxes: the smallest area bin of the
    cross-region pooling is (0, 1/32] of the image (section 3.2), and on a 200x150 image 1/32 is
    940 px^2. Windows smaller than 200 px^2 added search time on the synthetic set and no recall.
    Boxes smaller than `min_box_area` after clipping to the image are dropped.
    """
    alpha: float = 0.65  # step size of the sliding window search (IoU of neighbouring windows)
    beta: float = 0.75  # NMS threshold: IoU above which a lower-scored box is dropped
    eta: float = 1.0  # adaptation rate of the NMS threshold (1: fixed)
    min_score: float = 0.01  # windows scoring below are dropped (also a search short-cut)
    max_boxes: int = 1000
    edge_min_mag: float = 0.1  # edge pixels weaker than this are ignored
    edge_merge_thr: float = 0.5  # orientation change allowed while grouping edge pixels
    cluster_min_mag: float = 3.0  # edge groups with less total magnitude are merged or dropped
    max_aspect_ratio: float = 3.0
    min_box_area: float = 200.0  # px^2
    gamma: float = 2.0  # affinity sensitivity
    kappa: float = 1.5  # scale sensitivity
    edge_sigma: float = 2.0  # Gaussian blur before the gradient, px
    edge_scale: float = 30.0  # gradient (grey levels per px) at which the edge map is 1 - 1/e
    nms_radius: int = 1  # px along the normal within which an edge pixel must be the maximum
    # EdgeBoxes runs on the image shrunk to this longer side (the paper's input cap, Fast R-CNN's 1000),
    # boxes mapped back: time and memory per image stay bounded whatever the file's size
    max_side: int = 1000

    def __post_init__(self):
        # plain Python numbers, so that to_dict() serialises to JSON whatever numpy types came in
        for f in dataclasses.fields(self):
            v, integral = getattr(self, f.name), f.type in ("int", int)
            kinds = (int, np.integer) if integral else (int, float, np.integer, np.floating)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ValueError(f"ProposalParams.{f.name}={v!r}: expected {'an int' if integral else 'a number'}")
            object.__setattr__(self, f.name, int(v) if integral else float(v))
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"ProposalParams.alpha={self.alpha!r}: expected a value in (0, 1)")
        for name, low in (("max_boxes", 1), ("nms_radius", 0), ("max_side", 16)):
            if getattr(self, name) < low:
                raise ValueError(f"ProposalParams.{name}={getattr(self, name)!r}: expected >= {low}")
        for name in ("beta", "eta"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"ProposalParams.{name}={getattr(self, name)!r}: expected a value in (0, 1]")
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f"ProposalParams.max_aspect_ratio={self.max_aspect_ratio!r}: expected >= 1")
        for name in ("min_box_area", "edge_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProposalParams.{name}={getattr(self, name)!r}: expected > 0")
        for name in ("min_score", "edge_min_mag", "edge_merge_thr", "cluster_min_mag", "gamma", "kappa",
                     "edge_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ProposalParams.{name}={getattr(self, name)!r}: expected >= 0")

    def to_dict(self) -> dict:
        """JSON-able copy (goes into the shard manifest)."""
        return dataclasses.asdict(self)


def gradient_edges(image: np.ndarray, sigma: float, scale: float) -> np.ndarray:
    """Edge map from image gradients (no model file).

    The image is blurred (Gaussian, `sigma` px); per colour channel the Sobel gradient magnitude
    is taken in grey levels per pixel and the strongest channel kept (as the structured-edge
    features pick the strongest channel); `1 - exp(-g / scale)` maps it into [0, 1).

    Args:
        image: uint8 ndarray[H, W, 3] or [H, W].

    Returns:
        float32 ndarray[H, W] in [0, 1).
    """
    x = image.astype(np.float32)
    if sigma > 0:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    # the 3x3 Sobel kernel weighs a unit slope 8 times (rows 1+2+1, central difference over 2 px)
    gx = cv2.Sobel(x, -1, 1, 0, scale=0.125)
    gy = cv2.Sobel(x, -1, 0, 1, scale=0.125)
    mag = cv2.magnitude(gx, gy)  # (H, W) or (H, W, 3)
    if mag.ndim == 3:
        mag = cv2.max(cv2.max(mag[:, :, 0], mag[:, :, 1]), mag[:, :, 2])  # (H, W); 20x faster than numpy's
    return 1.0 - cv2.exp(mag * np.float32(-1.0 / scale))


def _triangle_smooth(image: np.ndarray, radius: int) -> np.ndarray:
    """OpenCV's structured-edge `imsmooth` (radius > 1): separable triangle [1 .. r+1 .. 1] / (r+1)^2."""
    k = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float32) / (radius + 1) ** 2
    return cv2.sepFilter2D(image, -1, k, k)


def compute_orientation(edges: np.ndarray) -> np.ndarray:
    """Edge-normal orientation as `StructuredEdgeDetection::computeOrientation` computes it.

    Triangle-smoothed edge map (radius 4), its Sobel second derivatives, then
    `O = atan(Oyy * -sign(Oxy) / (Oxx + 1e-5)) mod pi`. One deviation: where Oxy is exactly 0
    OpenCV's sign is 0, which makes every horizontal edge of a drawn, axis-aligned shape (and the
    image's border rows and columns, which EdgeBoxes ignores) vertical; it is taken as +1 here.

    Args:
        edges: float32 ndarray[H, W] edge map.

    Returns:
        float32 ndarray[H, W] normal angles in [0, pi] (0: normal along x, the edge runs vertically).
    """
    smooth = _triangle_smooth(edges, ORIENTATION_RADIUS)
    oxx = cv2.Sobel(smooth, -1, 2, 0)
    oxy = cv2.Sobel(smooth, -1, 1, 1)
    oyy = cv2.Sobel(smooth, -1, 0, 2)
    neg_sign = np.where(oxy > 0, np.float32(-1), np.float32(1))
    angle = np.arctan(oyy * neg_sign / (oxx + np.float32(1e-5)))  # (-pi/2, pi/2)
    return np.where(angle < 0, angle + np.float32(np.pi), angle)  # mod pi; np.mod is 5x slower


def edge_nms(edges: np.ndarray, orientation: np.ndarray, radius: int) -> np.ndarray:
    """Thin edges as OpenCV's `edgesNms(E, O, r=radius, s=0, m=1.01)`: zero a pixel where 1.01 times
    its value is below the bilinear sample of the map at distance 1..radius along its normal,
    either side (sample points clamped to the image). Vectorised: one `cv2.remap` per distance.

    Args:
        edges: float32 ndarray[H, W]; orientation: float32 ndarray[H, W] normal angles.

    Returns:
        float32 ndarray[H, W].
    """
    H, W = edges.shape
    keep = np.ones((H, W), bool)
    ys, xs = np.mgrid[:H, :W].astype(np.float32)  # (H, W) each
    cos, sin = np.cos(orientation), np.sin(orientation)
    scaled = edges * np.float32(NMS_MULTIPLIER)
    for d in [d for d in range(-radius, radius + 1) if d]:
        mx = np.clip(xs + d * cos, 0, W - 1)
        my = np.clip(ys + d * sin, 0, H - 1)
        keep &= scaled >= cv2.remap(edges, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.where(keep, edges, np.float32(0))


class EdgeBoxes:
    """EdgeBoxes proposals for one image at a time (see the module docstring).

    Args:
        params: the EdgeBoxes settings.
        edge_model: path of OpenCV's structured-edge model (`model.yml.gz`); None: gradient edges.
    """

    def __init__(self, params: ProposalParams = ProposalParams(), edge_model: str | os.PathLike | None = None):
        self.params = params
        self.edge_model = None if edge_model is None else os.fspath(edge_model)
        self._sed = None
        if self.edge_model is not None:
            if not os.path.isfile(self.edge_model):
                raise FileNotFoundError(f"structured-edge model file not found: {self.edge_model}")
            self._sed = cv2.ximgproc.createStructuredEdgeDetection(self.edge_model)

    def edges(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thinned edge map and orientation map of a uint8 [H, W, 3] RGB or [H, W] image: float32 ndarray[H, W] each."""
        if self._sed is None:
            e = gradient_edges(image, self.params.edge_sigma, self.params.edge_scale)
            o = compute_orientation(e)
            return edge_nms(e, o, self.params.nms_radius), o
        rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        e = self._sed.detectEdges(rgb.astype(np.float32) * np.float32(1 / 255))  # the forest wants RGB in [0, 1]
        o = self._sed.computeOrientation(e)
        return self._sed.edgesNms(e, o, r=MODEL_NMS_RADIUS, s=0, m=1.0), o

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Proposals for one image.

        Args:
            image: uint8 ndarray[H, W, 3] RGB or [H, W] grayscale, any size.

        Returns:
            boxes: float32 ndarray[T, 4], x1 y1 x2 y2 in pixels, inside the image, x2 > x1, y2 > y1,
                area >= min_box_area; best first.
            scores: float32 ndarray[T], descending. T <= max_boxes; 0 for an image without edges.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image: expected a uint8 ndarray, got {getattr(image, 'dtype', type(image).__name__)}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or 0 in image.shape:
            raise ValueError(f"image: expected shape [H, W, 3] or [H, W] with H, W > 0, got {list(image.shape)}")
        H, W = image.shape[:2]
        scale = min(self.params.max_side / max(H, W), 1.0)
        if scale == 1.0:
            return self._search(image)
        small = cv2.resize(image, (max(round(W * scale), 1), max(round(H * scale), 1)), interpolation=cv2.INTER_AREA)
        boxes, scores = self._search(small)
        return np.clip(boxes / np.float32(scale), 0, np.array([W, H, W, H], np.float32)), scores

    def _search(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`__call__` on an image no larger than max_side."""
        H, W = image.shape[:2]
        p = self.params
        # A fresh cv2 object per image: one that has searched an image before starts the next with
        # that image's segment magnitudes (clusterEdges `resize`s rather than zeroes `_segMag`), and
        # its per-row index lists keep growing; results would depend on the previous image.
        search = cv2.ximgproc.createEdgeBoxes(
            p.alpha, p.beta, p.eta, p.min_score, p.max_boxes, p.edge_min_mag, p.edge_merge_thr,
            p.cluster_min_mag, p.max_aspect_ratio, p.min_box_area, p.gamma, p.kappa)
        rects, scores = search.getBoundingBoxes(*self.edges(image))
        if len(rects) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        rects = np.asarray(rects, np.float32).reshape(-1, 4)  # (T, 4) x y w h
        scores = np.asarray(scores, np.float32).reshape(-1)  # (T,)
        x1, y1 = rects[:, 0] - 1, rects[:, 1] - 1  # the window covers pixels x - 1 .. x - 1 + w
        boxes = np.stack([x1, y1, x1 + rects[:, 2] + 1, y1 + rects[:, 3] + 1], axis=1)  # (T, 4)
        boxes = np.clip(boxes, 0, np.array([W, H, W, H], np.float32))
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (bw > 0) & (bh > 0) & (bw * bh >= self.params.min_box_area)
        boxes, scores = boxes[ok], scores[ok]  # (T', 4), (T',)
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]

    def __repr__(self) -> str:
        return f"EdgeBoxes(params={self.params}, edge_model={self.edge_model!r})"


def proposal_recall(proposals: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray],
                    iou_threshold: float = 0.5) -> float:
    """Fraction of ground-truth boxes covered by a proposal with IoU > `iou_threshold` (the usual
    proposal metric; Zitnick and Dollar's plots use it at IoU 0.5 and 0.7).

    Args:
        proposals: per image, ndarray[T_i, 4] x1 y1 x2 y2.
        gt_boxes: per image, ndarray[G_i, 4] x1 y1 x2 y2.

    Returns:
        recall in [0, 1].
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"proposals for {len(proposals)} image(s) but ground truth for {len(gt_boxes)}")
    total = sum(len(g) for g in gt_boxes)
    if total == 0:
        raise ValueError("gt_boxes: no ground-truth box in any image, recall is undefined")
    hits = 0
    for p, g in zip(proposals, gt_boxes):
        overlap = box_iou(np.asarray(p).reshape(-1, 4), np.asarray(g).reshape(-1, 4))  # (T_i, G_i)
        hits += int((overlap.max(axis=0, initial=0.0) > iou_threshold).sum())
    return hits / total


RECALL_IOUS = (0.5, 0.7)


def recall_counts(proposals: np.ndarray, gt_boxes: np.ndarray, width: int, height: int,
                  ks: Sequence[int]) -> dict[str, list[list[int]]]:
    """What `recall_summary` adds up, for one image: per top-k and area bin (section 3.2's, by the
    box's area / image area), [ground-truth boxes, found with IoU > 0.5, found with IoU > 0.7].

    Args:
        proposals: ndarray[T, 4], best first; gt_boxes: ndarray[G, 4] in the same pixels.
        ks: how many of the best proposals count (T of training, the whole stored list, ...).
    """
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    bins = area_bin((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]) / (width * height))  # (G,)
    overlap = box_iou(np.asarray(proposals, np.float64).reshape(-1, 4), gt)  # (T, G)
    out = {}
    for k in ks:
        best = overlap[:k].max(axis=0, initial=0.0)  # (G,)
        out[str(k)] = [[int((bins == b).sum()), *(int(((bins == b) & (best > t)).sum()) for t in RECALL_IOUS)]
                       for b in range(len(BIN_NAMES))]
    return out


def add_counts(total: dict, counts: dict) -> dict:
    """`recall_counts` summed in place into `total` (same keys); returns `total`."""
    for k, rows in counts.items():
        acc = total.setdefault(k, [[0] * len(r) for r in rows])
        for a, r in zip(acc, rows):
            a[:] = [x + y for x, y in zip(a, r)]
    return total


def recall_summary(counts: dict) -> dict:
    """Summed `recall_counts` -> {k: {"objects", "recall@0.5", "recall@0.7", "bins": {bin name: {...}}}}
    (None where a bin has no object)."""
    def rates(n: int, hits: list[int]) -> dict:
        return {"objects": n, **{f"recall@{t}": round(h / n, 4) if n else None for t, h in zip(RECALL_IOUS, hits)}}

    out = {}
    for k, rows in counts.items():
        n = sum(r[0] for r in rows)
        out[k] = {**rates(n, [sum(r[i + 1] for r in rows) for i in range(len(RECALL_IOUS))]),
                  "bins": {name: rates(r[0], r[1:]) for name, r in zip(BIN_NAMES, rows)}}
    return out
