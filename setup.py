"""Build of fusedset._C: C++ CPU kernels always, CUDA kernels when a CUDA toolchain is usable.

FUSEDSET_BUILD_CUDA=auto (default) builds the CUDA kernels when torch is a CUDA build and nvcc is
found; 1 requires them (the build fails without a toolchain); 0 skips them.
TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0").
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
_BUILD_SUMMARY: list[str] = []


def _say(message: str) -> None:
    print(f"fusedset setup: {message}", file=sys.stderr)


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root behind an nvcc, even when nvcc is a wrapper script outside the toolkit."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return str(Path(match.group(1).strip()).parent) if match else None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_root_from_nvcc(nvcc)


def _nvidia_wheel_includes() -> list[str]:
    """Include folders of the nvidia-* wheels: torch's CUDA headers include cusparse.h etc."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        for header in glob.glob(os.path.join(base, "*", "include", "cusparse.h")):
            found.append(os.path.dirname(header))
    return found


def _cuda_decision() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why."""
    import torch

    mode = os.environ.get("FUSEDSET_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FUSEDSET_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FUSEDSET_BUILD_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home = _find_cuda_home()
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = cuda_home
            return True, f"CUDA {torch.version.cuda} toolkit at {cuda_home}"
        reason = "nvcc was not found (set CUDA_HOME to the toolkit root)"
    if mode == "1":
        raise SystemExit(f"FUSEDSET_BUILD_CUDA=1 but {reason}")
    return False, reason


def _extensions():
    build_cuda, reason = _cuda_decision()
    # CUDA_HOME must be settled before cpp_extension is imported: it reads it at import time.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cpu_sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("ops/*.cpp"))
    cpu_sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("ops/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    common = dict(
        name="fusedset._C",
        include_dirs=[str(CSRC)],
        extra_link_args=["-fopenmp"],
    )
    if not build_cuda:
        _BUILD_SUMMARY.append(f"building the C++ CPU kernels only; CUDA kernels skipped: {reason}")
        return [CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common)]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    _BUILD_SUMMARY.append(f"building C++ CPU and CUDA kernels for {archs} ({reason})")
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("ops/cuda/*.c*"))
    common["include_dirs"] += _nvidia_wheel_includes()
    return [
        CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            **common,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))

    class Build(BuildExtension):
        # pip runs setup.py more than once; only the build itself reports what it builds.
        def run(self):
            for line in _BUILD_SUMMARY:
                _say(line)
            super().run()

    return {"build_ext": Build.with_options(use_ninja=True)}


setup(
    # benchmarks/ is installed as fusedset.bench, so `fusedset bench` runs from any install.
    packages=[*find_packages(include=["fusedset", "fusedset.*"]), "fusedset.bench"],
    package_dir={"fusedset.bench": "benchmarks"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
