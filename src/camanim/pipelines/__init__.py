"""Pipelines: each a small function that wires compute steps and returns a typed result.

:func:`~.explain.explain` (one capture, every method's raw map at every chosen layer), and the pipelines
built on it. No pipeline writes a file or draws; the results' writers, renderers and notebook display are
attached by :mod:`camanim.outputs`.
"""
