"""Builds expertflow._C (and the static core it links) with CMake.

Environment: EXPERTFLOW_CUDA=AUTO|ON|OFF selects the CUDA backend (default AUTO: built
when the toolkit is found); CMAKE_BUILD_PARALLEL_LEVEL sets build jobs.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement: only the extension's build needs it

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DEXPERTFLOW_CUDA={os.environ.get('EXPERTFLOW_CUDA', 'AUTO')}",
            "-DEXPERTFLOW_PYTHON=ON",
            "-DEXPERTFLOW_TESTS=OFF",
            "-DEXPERTFLOW_BENCH=OFF",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        subprocess.run(config, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C"], check=True)


setup(
    package_dir={"": "python"},
    packages=["expertflow", "expertflow.eval"],
    # profiles.json: the replay's hardware profiles; default_model/: the embedded default
    # model (bench/train_default.py), config, weights and tokenizer.
    package_data={"expertflow": ["py.typed", "_C.pyi", "profiles.json", "default_model/*"]},
    ext_modules=[Extension("expertflow._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
