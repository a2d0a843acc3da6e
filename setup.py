"""Build of the native extension ``edmfast._C`` (pybind11; build requirements: setuptools + pybind11).

The package metadata lives in pyproject.toml; this file only adds the extension module.
torch is deliberately not imported: kernels take raw pointers, so one wheel serves any torch.

* CPU sources (csrc/cpu/*.cpp, csrc/bindings.cpp) are always built, with ``-fopenmp-simd`` (the
  ``omp simd`` loop hints only: threads come from the extension's own sleeping helper pool, so
  there is no OpenMP runtime to link, vendor or fight torch's pool).
* CUDA sources (csrc/cuda/*.cu) are built when nvcc is found (``$CUDA_HOME/bin/nvcc``,
  ``/usr/local/cuda/bin/nvcc``, then ``nvcc`` on PATH), through ninja when available (parallel),
  else one nvcc call per file, and linked with the static CUDA runtime so the extension neither
  needs a toolkit installed at run time nor fails to import on a machine without a GPU.

Environment switches (build only):
  EDMFAST_CUDA=auto|0|1   auto (default): CUDA when nvcc is found; 0: CPU only; 1: fail without nvcc
  EDMFAST_CUDA_ARCH=80;90 compute capabilities to compile for (default 80 and 90: A100, H100/H200)
  MAX_JOBS=N              parallel compile jobs (default: all cores)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, has_flag
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
JOBS = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)


def _rel(paths: list[Path]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


CPU_SOURCES = _rel([ROOT / "csrc" / "bindings.cpp", *(ROOT / "csrc" / "cpu").glob("*.cpp")])
CUDA_SOURCES = _rel(list((ROOT / "csrc" / "cuda").glob("*.cu")))
HEADERS = _rel(list((ROOT / "csrc" / "include" / "edmfast").glob("*.h")))


def find_nvcc() -> Path | None:
    """nvcc to use, or None for a CPU-only build (EDMFAST_CUDA=auto|0|1, see the module docstring)."""
    mode = os.environ.get("EDMFAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"EDMFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var], "bin", "nvcc"))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for nvcc in candidates:
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return nvcc.resolve()
    if mode == "1":
        raise RuntimeError("EDMFAST_CUDA=1 but nvcc was not found; set CUDA_HOME to the CUDA toolkit")
    return None


def gencode_flags() -> list[str]:
    archs = re.split(r"[;,\s]+", os.environ.get("EDMFAST_CUDA_ARCH", "80;90").strip())
    flags = []
    for arch in filter(None, archs):
        arch = arch.replace(".", "")
        if not re.fullmatch(r"\d+[a-z]?", arch):
            raise RuntimeError(f"EDMFAST_CUDA_ARCH entries look like 80 or 90a, got {arch!r}")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def cuda_link(cuda_home: Path) -> tuple[list[str], list[str], list[str]]:
    """(extra objects, libraries, library dirs) for cudart: static when the toolkit ships it."""
    for libdir in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib"):
        static = libdir / "libcudart_static.a"
        if static.is_file():
            # The static runtime loads libcuda.so lazily at the first CUDA call, so importing the
            # extension works without a driver; it needs librt, libpthread and libdl.
            return [str(static)], ["rt", "pthread", "dl"], []
    for libdir in (cuda_home / "lib64", cuda_home / "lib"):
        if (libdir / "libcudart.so").exists():
            return [], ["cudart"], [str(libdir)]
    raise RuntimeError(f"no libcudart under {cuda_home}")


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects that the C++ link of _C picks up."""

    def build_extension(self, ext):
        compiler = self.compiler
        if has_flag(compiler, "-fopenmp-simd"):
            ext.extra_compile_args.append("-fopenmp-simd")
        nvcc = find_nvcc()
        if nvcc is not None:
            cuda_home = nvcc.parent.parent
            objects = self._compile_cuda(nvcc)
            static, libraries, library_dirs = cuda_link(cuda_home)
            ext.extra_objects += objects + static
            ext.libraries += libraries
            ext.library_dirs += library_dirs
            ext.runtime_library_dirs += library_dirs
            ext.define_macros.append(("EDMFAST_WITH_CUDA", "1"))
            print(f"edmfast: building CUDA kernels with {nvcc} ({' '.join(gencode_flags())})")
        else:
            print("edmfast: building without CUDA (nvcc not found or EDMFAST_CUDA=0)")
        # setuptools relinks only when a source is newer than the built module, so a CPU-only
        # build/ left in the tree would silently stand in for a CUDA build (or the reverse).
        # A stamp of the configuration, rewritten when it changes, is one more dependency.
        config = f"nvcc={nvcc} gencode={gencode_flags() if nvcc else None} flags={ext.extra_compile_args}"
        stamp = Path(self.build_temp).resolve() / "edmfast-build-config.txt"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file() or stamp.read_text() != config:
            stamp.write_text(config)
        ext.depends.append(str(stamp))
        super().build_extension(ext)

    def _compile_cuda(self, nvcc: Path) -> list[str]:
        out_dir = Path(self.build_temp).resolve() / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-std=c++17", "-O3", "-DNDEBUG", f"-I{ROOT / 'csrc' / 'include'}",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            *gencode_flags(),
        ]  # fmt: skip
        objects = [str(out_dir / (Path(src).stem + ".o")) for src in CUDA_SOURCES]
        if shutil.which("ninja"):
            self._ninja(nvcc, flags, out_dir, objects)
        else:
            for src, obj in zip(CUDA_SOURCES, objects, strict=True):
                self._run([str(nvcc), *flags, "-c", str(ROOT / src), "-o", obj])
        return objects

    def _ninja(self, nvcc: Path, flags: list[str], out_dir: Path, objects: list[str]) -> None:
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"flags = {shlex.join(flags)}",
            "rule nvcc",
            "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
        ]
        for src, obj in zip(CUDA_SOURCES, objects, strict=True):
            lines.append(f"build {obj}: nvcc {ROOT / src}")
        (out_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        self._run(["ninja", "-C", str(out_dir), f"-j{JOBS}"])

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


ParallelCompile("MAX_JOBS", default=JOBS).install()

ext = Pybind11Extension(
    "edmfast._C",
    CPU_SOURCES,
    include_dirs=[str(ROOT / "csrc" / "include")],
    define_macros=[("EDMFAST_VERSION", f'"{VERSION}"')],
    # -fno-math-errno lets sqrtf inline and -fno-trapping-math lets the branch-free Philox/Box-Muller
    # loop vectorize (its selects become blends); neither changes a single result. -ffp-contract=off
    # keeps the AVX-512 variant of that loop (AVX-512F brings FMA) bit-identical to the AVX2 and
    # baseline ones. Never -ffast-math: the Philox range reductions rely on exact float32 products
    # and sums.
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
    depends=HEADERS,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
