"""Multi-scale cross-region max pooling (section 3.2).

Regions are grouped by their area relative to the image into 5 right-closed bins
(0,1/32], (1/32,1/16], (1/16,1/8], (1/8,1/4], (1/4,1] (or one bin with `scales=1`); each
feature is max-pooled over the regions of each bin and the bins are concatenated. The whole
thing is one `scatter_reduce(amax)` over an (image, bin) index: no Python loop over regions.
Autograd routes the gradient of each (bin, feature) to its arg-max region, as section 3.3 says
(ties, which do not happen with real-valued features, would share it evenly).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rgnn.scales import AREA_EDGES

SCALES = (1, 5)


def area_bins(area_ratio: Tensor, scales: int = 5) -> Tensor:
    """The scale bin of each region.

    Args:
        area_ratio: Tensor[R], region area / image area.
        scales: 5 (the paper's bins) or 1 (a single bin).

    Returns:
        long Tensor[R] in [0, scales). Bins are right-closed: a ratio of exactly 1/32 is in bin 0,
        exactly 1/4 in bin 3; ratios above 1 (boxes leaving the image) go to the last bin.
    """
    if scales not in SCALES:
        raise ValueError(f"scales={scales!r}: expected one of {SCALES}")
    if scales == 1:
        return torch.zeros_like(area_ratio, dtype=torch.long)
    edges = torch.tensor(AREA_EDGES, dtype=area_ratio.dtype, device=area_ratio.device)
    # right=False: edges[i-1] < ratio <= edges[i] -> i, i.e. right-closed bins (1/32 -> 0)
    return torch.bucketize(area_ratio, edges, right=False)


def cross_region_max_pool(x: Tensor, area_ratio: Tensor, image_index: Tensor, num_images: int,
                          scales: int = 5) -> Tensor:
    """z_{s,k} = max{x_{i,k} | R_i in scale group s} for every image (section 3.2).

    Args:
        x: Tensor[R, D], the (gated) region features of all images of the batch.
        area_ratio: Tensor[R], region area / image area.
        image_index: long Tensor[R], the image of each region, in [0, num_images).
        num_images: N.
        scales: 5 or 1.

    Returns:
        Tensor[N, scales * D]: image n's scale-s features at [n, s * D:(s + 1) * D]. A bin without
        regions gives 0 (the model pools non-negative features, so 0 is "no evidence").
    """
    if x.dim() != 2:
        raise ValueError(f"x must be Tensor[R, D], got shape {tuple(x.shape)}")
    R, D = x.shape
    if area_ratio.shape != (R,) or image_index.shape != (R,):
        raise ValueError(f"area_ratio {tuple(area_ratio.shape)} and image_index {tuple(image_index.shape)} "
                         f"must both be [R] with R={R}")
    if num_images < 0:
        raise ValueError(f"num_images={num_images} must be >= 0")
    group = image_index.long() * scales + area_bins(area_ratio, scales)  # (R,) flat (image, bin) index
    out = x.new_zeros(num_images * scales, D)
    # include_self=False: an empty bin keeps its 0 and never competes with the regions' values;
    # a contiguous index: with an expanded (stride-0) one the multi-threaded CPU kernel is ~1000x slower
    index = group.unsqueeze(1).expand(R, D).contiguous()  # (R, D)
    out = out.scatter_reduce(0, index, x, reduce="amax", include_self=False)
    return out.view(num_images, scales * D)  # (N, S*D)


class CrossRegionMaxPool(nn.Module):
    """Module form of `cross_region_max_pool` (no parameters)."""

    def __init__(self, scales: int = 5):
        super().__init__()
        if scales not in SCALES:
            raise ValueError(f"scales={scales!r}: expected one of {SCALES}")
        self.scales = scales

    def forward(self, x: Tensor, area_ratio: Tensor, image_index: Tensor, num_images: int) -> Tensor:
        return cross_region_max_pool(x, area_ratio, image_index, num_images, self.scales)

    def extra_repr(self) -> str:
        return f"scales={self.scales}"
