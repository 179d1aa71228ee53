"""The 5 area bins of section 3.2, torch-free: multi-scale cross-region max pooling (rgnn.nn.pooling)
bins regions by them, and the sharding job reports proposal recall by them."""
from __future__ import annotations

import numpy as np

# the upper edges of the first four bins of region area / image area; the fifth is (1/4, 1]
AREA_EDGES = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
BIN_NAMES = ("<=1/32", "1/32-1/16", "1/16-1/8", "1/8-1/4", ">1/4")


def area_bin(area_ratio: np.ndarray) -> np.ndarray:
    """float ndarray[R] -> int ndarray[R] in [0, 5): right-closed bins, as rgnn.nn.pooling.area_bins."""
    return np.searchsorted(np.asarray(AREA_EDGES), np.asarray(area_ratio, np.float64), side="left")
