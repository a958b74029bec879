"""Dock widgets: a thin Qt layer that runs the core in workers and shows results as layers."""
