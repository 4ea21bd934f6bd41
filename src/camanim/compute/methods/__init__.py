"""CAM methods, registered by name: one module per family (:mod:`.gradient`, :mod:`.eigen`,
:mod:`.perturbation`, :mod:`.second_order`, ...), each method a small class on :class:`~.base.CAMMethod`.

Importing this package imports every family, which registers its methods (listed family by family in
:data:`~.base.FAMILY_ORDER`).
"""

from camanim.compute.methods import (  # noqa: F401  (registers the methods)
    activation,
    attention,
    classifier,
    eigen,
    factorization,
    finer,
    fullgrad,
    gradient,
    guided,
    perturbation,
    refine,
    sampling,
    scale,
    score,
    second_order,
)
from camanim.compute.methods.base import (
    CAMMethod,
    get_method,
    list_methods,
    method_class,
    parse_methods,
    register_method,
)

__all__ = ["CAMMethod", "get_method", "list_methods", "method_class", "parse_methods", "register_method"]
