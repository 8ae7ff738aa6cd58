"""Compile every Triton kernel of the package for sm_80 and sm_90, without a GPU.

    python -m fusedset.tools.compile_check [--arch 80 90] [--module FILE_OR_MODULE] [--only NAME]

For each registered kernel, each of its variants and each autotune config, ``triton.compile``
targets the architecture, Triton's bundled ``ptxas -v`` reads the PTX back, and a table of
registers, spill bytes and shared memory is printed. The CUDA C++ kernels already compiled into
``fusedset._C`` are listed the same way (from ``cuobjdump --dump-resource-usage``). Exits 1 on
any compile error, any spill, shared memory over the architecture's limit, or a kernel that was
never registered. Run it without TRITON_INTERPRET: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# Largest shared memory one block may use (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Row:
    kernel: str
    variant: str
    config: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or bool(self.spill_bytes) or self.over_shared_limit

    @property
    def over_shared_limit(self) -> bool:
        return self.shared_bytes is not None and self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]


def _import_target(target: str) -> ModuleType:
    path = Path(target)
    if path.suffix == ".py" and path.exists():
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {target}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def _package_modules() -> list[ModuleType]:
    import fusedset.triton_kernels as package

    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
    ]


def _jit_function(kernel):
    """The JITFunction under any autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _autotune_configs(kernel) -> list:
    from triton.runtime.autotuner import Autotuner

    while not isinstance(kernel, Autotuner):
        if not hasattr(kernel, "fn"):
            return [None]
        kernel = kernel.fn
    return list(kernel.configs)


def _unregistered(modules: Iterable[ModuleType], registered: set[int]) -> list[str]:
    from triton.runtime.jit import KernelInterface

    missing = []
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, KernelInterface) and id(_jit_function(value)) not in registered:
                missing.append(f"{module.__name__}.{name}")
    return missing


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store + load bytes, static shared bytes) from ptxas -v."""
    ptxas = _nvidia_tool("ptxas")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    gpu_name = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", gpu_name, str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=False,
        )
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()}")
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    smem = re.search(r"(\d+) bytes smem", log)
    return registers, spills, int(smem.group(1)) if smem else 0


def _config_label(config) -> str:
    if config is None:
        return "-"
    params = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{params},w{config.num_warps},s{config.num_stages}"


def check(registered, archs: Sequence[int]) -> list[Row]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for entry in registered:
        fn = _jit_function(entry.kernel)
        for variant in entry.variants:
            for config in _autotune_configs(entry.kernel):
                constexprs = dict(variant.constexprs)
                options = dict(variant.options)
                if config is not None:
                    constexprs.update(config.kwargs)
                    options.update(num_warps=config.num_warps, num_stages=config.num_stages)
                for arch in archs:
                    row = Row(entry.name, variant.label, _config_label(config), arch)
                    rows.append(row)
                    try:
                        signature = {
                            name: "constexpr" if name in constexprs else variant.signature[name]
                            for name in fn.arg_names
                        }
                        compiled = triton.compile(
                            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options=options,
                        )
                        row.registers, row.spill_bytes, static_smem = _ptxas_report(
                            compiled.asm["ptx"], arch
                        )
                        row.shared_bytes = compiled.metadata.shared + static_smem
                    except KeyError as exc:
                        row.error = f"variant {variant.label!r} gives no type for argument {exc}"
                    except Exception as exc:  # any compile failure is a row of the report
                        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
    return rows


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return names
    return out.splitlines()


def extension_rows(archs: Sequence[int]) -> list[Row]:
    """Resource usage of the CUDA C++ kernels compiled into fusedset._C (none in a CPU build).

    cuobjdump reports spills as LOCAL bytes per thread."""
    spec = importlib.util.find_spec("fusedset._C")
    if spec is None or spec.origin is None:
        return []
    result = subprocess.run(
        [str(_nvidia_tool("cuobjdump")), "--dump-resource-usage", spec.origin],
        capture_output=True,
        text=True,
        check=False,
    )
    rows, mangled = [], []
    arch = None
    for line in result.stdout.splitlines():
        if match := re.match(r"arch = sm_(\d+)", line.strip()):
            arch = int(match.group(1))
        elif match := re.match(r"\s*Function (\S+):", line):
            mangled.append(match.group(1))
        elif line.strip().startswith("REG:") and arch in archs:
            usage = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append(
                Row(
                    kernel=mangled[-1],
                    variant="",
                    config="CUDA C++",
                    arch=arch,
                    registers=int(usage["REG"]),
                    spill_bytes=int(usage["LOCAL"]),
                    shared_bytes=int(usage["SHARED"]),
                )
            )
    for row, name in zip(rows, _demangle([r.kernel for r in rows]), strict=True):
        # "ns::kernel<T, acc, flag>(args)" -> kernel "kernel", variant "<T, acc, flag>"
        head = name.replace("(anonymous namespace)::", "").split("(")[0]
        base, _, targs = head.partition("<")
        row.kernel = base.split("::")[-1]
        row.variant = f"<{targs}" if targs else "-"
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("kernel", "variant", "config", "arch", "regs", "spill B", "smem B", "status")
    lines = [header]
    for r in rows:
        if r.error:
            status = f"ERROR {r.error}"
        elif r.spill_bytes:
            status = "FAIL spills"
        elif r.over_shared_limit:
            status = f"FAIL smem > {SHARED_MEMORY_LIMIT[r.arch]}"
        else:
            status = "ok"
        lines.append(
            (
                r.kernel,
                r.variant,
                r.config,
                f"sm_{r.arch}",
                "-" if r.registers is None else str(r.registers),
                "-" if r.spill_bytes is None else str(r.spill_bytes),
                "-" if r.shared_bytes is None else str(r.shared_bytes),
                status,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT)
    )
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        help="also check the kernels of this module (dotted name or .py file)",
    )
    parser.add_argument("--only", action="append", default=[], help="check only kernels named so")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_check: triton is not installed (it comes with CUDA builds of torch)")
        return 2

    from fusedset.triton_kernels import HELPERS, REGISTRY

    modules = _package_modules() + [_import_target(t) for t in args.module]
    registered = [k for k in REGISTRY if not args.only or k.name in args.only]
    checked = {id(_jit_function(k.kernel)) for k in REGISTRY} | {id(h) for h in HELPERS}
    missing = _unregistered(modules, checked)
    rows = check(registered, args.arch)
    if not args.module and not args.only:
        rows += extension_rows(args.arch)

    if rows:
        print(format_table(rows))
    failed = [r for r in rows if r.failed]
    for name in missing:
        print(f"UNREGISTERED {name}: decorate it with fusedset.triton_kernels.compile_checked")
    kernels = len({(r.kernel, r.config == "CUDA C++") for r in rows})
    print(
        f"compile_check: {len(rows)} kernel builds ({kernels} kernels) for "
        f"{', '.join(f'sm_{a}' for a in args.arch)}: {len(failed)} failed, "
        f"{len(missing)} unregistered"
    )
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
