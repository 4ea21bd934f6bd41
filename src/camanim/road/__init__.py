"""ROAD (Remove And Debias, Rong et al. 2022) and ybROAD.

The noisy linear imputation at its heart is in :mod:`.imputers`; the metric (a pure function and a stateful
class) in :mod:`.metric`; the per-layer series of the CAManim paper (ybROAD) in :mod:`.ybroad`.
"""

from camanim.compute.metrics.imputers import (
    IMPUTERS,
    CachedImputer,
    ImputationError,
    Imputer,
    NoisyLinearImputer,
    SpsolveImputer,
    get_imputer,
)
from camanim.compute.metrics.road import (
    DEFAULT_PERCENTAGES,
    ROAD,
    RoadError,
    RoadScores,
    removal_masks,
    removal_order,
    road_scores,
)
from camanim.road.ybroad import (
    YbRoad,
    YbRoadResult,
    best_layer,
    save_ybroad,
    smooth_series,
    write_ybroad,
    ybroad,
)

__all__ = [
    "IMPUTERS",
    "CachedImputer",
    "ImputationError",
    "Imputer",
    "NoisyLinearImputer",
    "SpsolveImputer",
    "get_imputer",
    "DEFAULT_PERCENTAGES",
    "ROAD",
    "RoadError",
    "RoadScores",
    "removal_masks",
    "removal_order",
    "road_scores",
    "YbRoad",
    "YbRoadResult",
    "best_layer",
    "save_ybroad",
    "smooth_series",
    "write_ybroad",
    "ybroad",
]
