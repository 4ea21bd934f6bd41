"""ROAD (Remove And Debias, Rong et al. 2022): the noisy linear imputation at its heart, in :mod:`.imputers`."""

from camanim.road.imputers import (
    IMPUTERS,
    CachedImputer,
    ImputationError,
    Imputer,
    NoisyLinearImputer,
    SpsolveImputer,
    get_imputer,
)

__all__ = [
    "IMPUTERS",
    "CachedImputer",
    "ImputationError",
    "Imputer",
    "NoisyLinearImputer",
    "SpsolveImputer",
    "get_imputer",
]
