"""The RedDino dock widgets (napari imports them when they are opened, after OpenGL is up)."""

from ..triton_guard import guard_triton

guard_triton()
