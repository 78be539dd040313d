"""Figures and widgets for the book. Each module imports matplotlib or ipywidgets only when called.

:mod:`hybridpar.viz.static` says which widgets work in the static book (precomputed views behind
``jslink``-ed controls) and which need a live kernel; :mod:`hybridpar.viz.units` prints byte counts
in binary units (KiB, MiB, GiB) for every figure and widget.
"""
