"""The version of camanim."""

__version__ = "0.1.0"
