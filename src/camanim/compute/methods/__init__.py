"""CAM methods, registered by name: one module per family (:mod:`.gradient`, :mod:`.eigen`,
:mod:`.perturbation`), each method a small class on :class:`~.base.CAMMethod`.

Importing this package imports every family, which registers its methods (the import order sets the
listing order of :func:`list_methods`).
"""

from camanim.compute.methods import eigen, gradient, perturbation  # noqa: F401  (registers the methods)
from camanim.compute.methods.base import (
    CAMMethod,
    get_method,
    list_methods,
    method_class,
    parse_methods,
    register_method,
)

__all__ = ["CAMMethod", "get_method", "list_methods", "method_class", "parse_methods", "register_method"]
