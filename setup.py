"""Build fastgpt and its C++ CPU kernels.

The kernels in csrc/ are compiled three times, once per instruction set (as ATen does with its
CPU_CAPABILITY builds), into fastgpt/_C_default.so, _C_avx2.so and _C_avx512.so. At run time
fastgpt loads the best build the CPU supports; FASTGPT_CPU_ISA=default|avx2|avx512 forces a lower
one. No -march=native (a wheel must run on other CPUs), no -ffast-math (it would change denormal
handling for the whole process).

    pip install torch==2.13.0            # CPU build; fastgpt builds against the torch present
    pip install --no-build-isolation -e .
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "fastgpt builds its C++ kernels against the installed PyTorch, and none was found.\n"
        "Install the CPU build first, then build without isolation:\n"
        "    pip install torch==2.13.0\n"
        "    pip install --no-build-isolation -e .\n"
    )

if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
    sys.exit(
        "fastgpt needs a C++17 compiler to build its CPU kernels and none was found.\n"
        "Install one (Debian/Ubuntu: apt-get install g++), then run the install again."
    )

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

SOURCES = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
DEPENDS = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h"))

COMMON_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY_DEFAULT", "-DCPU_CAPABILITY=DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=AVX512",
    ],
}
# FASTGPT_BUILD_ISAS=avx512 (comma list) builds only some variants: quicker while developing.
BUILD_ISAS = [i for i in os.environ.get("FASTGPT_BUILD_ISAS", "").split(",") if i] or list(
    ISA_FLAGS
)
# FASTGPT_SANITIZE=address builds every ISA variant with AddressSanitizer (see README).
SANITIZE = os.environ.get("FASTGPT_SANITIZE", "")
SAN_FLAGS = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"] if SANITIZE else []


def isa_extension(isa: str) -> CppExtension:
    return CppExtension(
        name=f"fastgpt._C_{isa}",
        sources=SOURCES,
        depends=DEPENDS,
        extra_compile_args=COMMON_FLAGS + ISA_FLAGS[isa] + SAN_FLAGS,
        extra_link_args=["-fopenmp"] + SAN_FLAGS,
    )


class PerISABuild(BuildExtension):
    """Gives each ISA variant its own object folder: the same sources are compiled with
    different flags, and shared object paths would make ninja reuse the wrong objects."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


# FASTGPT_NO_EXT=1 registers the package without compiling (scripts/setup.sh then builds the
# kernels in place with `setup.py build_ext --inplace`, incrementally).
NO_EXT = os.environ.get("FASTGPT_NO_EXT") == "1"

setup(
    packages=find_packages(include=["fastgpt", "fastgpt.*"]),
    ext_modules=[] if NO_EXT else [isa_extension(isa) for isa in BUILD_ISAS],
    cmdclass={"build_ext": PerISABuild.with_options(use_ninja=True)},
)
