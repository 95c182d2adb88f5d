"""Builds edkm's native library with CMake and packages it with the Python code in python/edkm.

`pip install --no-build-isolation -e .` (or a wheel) runs CMake against the torch that is
installed in the running Python, so the library matches that torch's ABI.
"""
import os
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # setuptools clears `inplace` while building and copies the results afterwards; CMake
        # writes the package's native files itself, so remember where they belong.
        self._edkm_inplace = bool(self.inplace) or bool(getattr(self, "editable_mode", False))
        super().run()

    def copy_extensions_to_source(self):
        pass  # CMake already wrote them into python/edkm

    def build_extension(self, ext):
        import torch

        source_package = os.path.join(ROOT, "python", "edkm")
        inplace = getattr(self, "_edkm_inplace", False)
        package_dir = (
            source_package if inplace else os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        )
        # The in-place build shares build/ with `make build` (same settings: no rebuild);
        # wheels get their own tree.
        build_dir = os.environ.get(
            "EDKM_BUILD_DIR", os.path.join(ROOT, "build") if inplace else os.path.join(self.build_temp, "cmake")
        )
        os.makedirs(build_dir, exist_ok=True)
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DEDKM_PYTHON_PACKAGE_DIR={package_dir}",
            f"-DEDKM_BUILD_TESTS={os.environ.get('EDKM_BUILD_TESTS', 'OFF')}",
        ]
        if os.environ.get("EDKM_GTEST_SOURCE_DIR"):
            configure.append(f"-DEDKM_GTEST_SOURCE_DIR={os.environ['EDKM_GTEST_SOURCE_DIR']}")
        launcher = os.environ.get("EDKM_COMPILER_LAUNCHER")  # e.g. sccache (scripts/build.sh)
        if launcher:
            configure += [f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CUDA_COMPILER_LAUNCHER={launcher}"]
        if os.environ.get("EDKM_WITH_CUDA"):
            configure.append(f"-DEDKM_WITH_CUDA={os.environ['EDKM_WITH_CUDA']}")
        subprocess.check_call(configure)
        jobs = os.environ.get("EDKM_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", build_dir, "-j", jobs])


setup(
    name="edkm",
    version="0.1.0",
    description="Train-time weight clustering (eDKM) for large language models, on LibTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"edkm": ["lm_eval_tasks/*.yaml"]},
    ext_modules=[CMakeExtension("edkm._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tqdm"],
    entry_points={"console_scripts": ["edkm = edkm.cli:main"]},
    zip_safe=False,
)
