"""Figures and widgets for the book. Each module imports matplotlib or ipywidgets only when called."""
