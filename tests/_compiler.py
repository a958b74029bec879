"""Whether torch.compile can build CPU kernels here: it needs a C++ compiler and Python's headers."""

import shutil
import sysconfig
from pathlib import Path

import pytest

needs_a_cxx_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    reason="torch.compile on a CPU needs a C++ compiler and Python's headers")
