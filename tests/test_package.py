import os
import shutil
import subprocess
import sys

import torch

import fusedset


def test_extension_is_built_and_loaded():
    """CI builds the extension: the kernel tests must not silently run on a fallback."""
    available = fusedset.backends()
    assert available["cpp_cpu"], available
    assert available["reference_forced"] is False


def test_cuda_kernels_are_built_when_torch_is_a_cuda_build_and_nvcc_is_found():
    """The default build (FUSEDSET_BUILD_CUDA=auto) compiles every .cu file for sm_80 and sm_90."""
    if torch.version.cuda is None:
        assert fusedset.backends()["cuda_kernels"] is False
    elif shutil.which("nvcc") and os.environ.get("FUSEDSET_BUILD_CUDA", "auto") != "0":
        assert fusedset.backends()["cuda_kernels"], fusedset.backends()


def test_every_op_has_a_cpu_kernel_and_a_cuda_kernel_with_triton():
    """A CUDA tensor must never fall back to the eager reference because an op's Triton or CUDA
    kernel was left unregistered (the interpreter tests call the Triton functions directly and
    would not notice)."""
    from fusedset import _dispatch

    ops = sorted(
        s.name.removeprefix("fusedset::")
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("fusedset::")
    )
    assert {"style_pool", "cluster_accumulate", "quality_fps", "quality_fps_select"} <= set(ops)
    assert [op for op in ops if not _dispatch.has_kernel(op, "cpu")] == []
    if fusedset.backends()["cuda_kernels"] and _dispatch.triton_importable():
        assert [op for op in ops if not _dispatch.has_kernel(op, "cuda")] == []


def test_import_works_without_a_gpu():
    code = (
        "import fusedset, torch; assert not torch.cuda.is_available(); print(fusedset.__version__)"
    )
    env_hides_gpus = {"CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env_hides_gpus},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fusedset.__version__


def test_force_reference_switch_nests_and_restores():
    assert not fusedset.reference_forced()
    with fusedset.force_reference():
        assert fusedset.reference_forced()
        with fusedset.force_reference(False):
            assert not fusedset.reference_forced()
        assert fusedset.reference_forced()
    assert not fusedset.reference_forced()


def test_every_cuda_kernel_of_the_gpu_folder_takes_its_schemas_arguments():
    """fusedset.triton_kernels registers each op's CUDA implementation from its own folder; a
    function whose parameters drift from the op's schema would take the wrong arguments."""
    import importlib
    import inspect

    import pytest

    pytest.importorskip("triton")
    from fusedset import triton_kernels

    table = {
        op: (f"fusedset.triton_kernels.{module}", name)
        for op, (module, name) in triton_kernels.CUDA_KERNELS.items()
    } | triton_kernels.EAGER_CUDA_KERNELS
    for op, (module, name) in table.items():
        schema = getattr(torch.ops.fusedset, op).default._schema
        fn = getattr(importlib.import_module(module), name)
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], op


def test_every_public_op_takes_its_positional_arguments_in_its_schemas_order():
    """A caller of fusedset.ops.<op> and of torch.ops.fusedset.<op> passes the same arguments in
    the same order (keyword-only and Python-only arguments, like a noise generator, aside).
    cluster_accumulate_caface is the documented exception: CAFace's names for
    cluster_accumulate's schema with its flags set (docs/architecture.md)."""
    import inspect

    from fusedset import ops

    python_only = {"generator"}
    for name in ("style_pool", "cluster_accumulate", "quality_fps", "quality_fps_select",
                 "sinusoid_attention_pool"):  # fmt: skip
        schema = [a.name for a in getattr(torch.ops.fusedset, name).default._schema.arguments]
        positional = [
            p.name
            for p in inspect.signature(getattr(ops, name)).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name not in python_only
        ]
        assert positional == [a for a in schema if a in positional], name
        assert set(positional) <= set(schema), name
