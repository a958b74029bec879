"""The RedDino dock widgets (napari imports them when they are opened, after OpenGL is up)."""

from ..triton_guard import block_triton_if_llvm_loaded

block_triton_if_llvm_loaded()
