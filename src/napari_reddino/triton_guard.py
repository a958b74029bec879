"""Keep torch from importing triton where that would crash napari.

Mesa's software OpenGL (llvmpipe: virtual and remote displays, machines without a GPU
driver) loads the system libLLVM into napari's process. torch and torchvision import triton
to see whether it is there (torch._dynamo, which torchvision's ops import); triton carries its
own LLVM, and loading it next to Mesa's segfaults the whole process. So when a system libLLVM
is mapped at the moment triton would be imported, the import fails as if triton were not
installed and torch runs without it (the widgets never use torch.compile, the only thing that
needs triton; the Python API and reddino-analyse offer it). The check waits for triton's
import itself: torch may have been imported before napari's window brought OpenGL in (a
notebook that imported torch first), and torchvision after.
"""

import importlib.abc
import importlib.machinery
import sys


class _BeforeTriton(importlib.abc.MetaPathFinder):
    """Runs the check when ``triton`` is first looked up; where it blocks, importing it fails as
    if it were not installed. (Found, not None: ``importlib.util.find_spec`` callers such as
    torch.cuda's lazy set-up expect a spec or None, not an error, and import it only to use it.)"""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" and block_triton_if_llvm_loaded():
            return importlib.machinery.ModuleSpec(name, _Refused())
        return None


class _Refused(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError("triton is kept out of a process that holds Mesa's LLVM", name=spec.name)

    def exec_module(self, module) -> None:
        """Never reached: :meth:`create_module` refuses."""


def guard_triton() -> None:
    """Check now, and again when triton is first looked up (Linux; once per process)."""
    if sys.platform.startswith("linux") and not any(isinstance(f, _BeforeTriton) for f in sys.meta_path):
        block_triton_if_llvm_loaded()
        sys.meta_path.insert(0, _BeforeTriton())


def block_triton_if_llvm_loaded() -> bool:
    """True when triton was blocked because a libLLVM is already in this (Linux) process."""
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return sys.modules.get("triton", True) is None  # blocked already
    try:
        with open("/proc/self/maps") as maps:
            llvm_loaded = any("libLLVM" in line for line in maps)
    except OSError:
        return False
    if llvm_loaded:
        sys.modules["triton"] = None  # a later `import triton` raises ImportError at once
    return llvm_loaded
