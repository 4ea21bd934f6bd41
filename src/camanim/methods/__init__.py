"""CAM methods, registered by name. One module per family: :mod:`.gradient`, :mod:`.eigen`."""

from camanim.methods.base import (
    CAMMethod,
    get_method,
    list_methods,
    method_class,
    parse_methods,
    register_method,
)

__all__ = ["CAMMethod", "get_method", "list_methods", "method_class", "parse_methods", "register_method"]
