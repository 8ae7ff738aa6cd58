"""``fusedset fuse`` end to end on small generated files in each format, and its error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedset.cli import main
from fusedset.methods import Template, get_method

from .checkpoints import LAYOUTS, random_modules, write_checkpoint
from .helpers import cuda_only


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    sizes = [1, 7, 3, 20, 2]
    templates = np.repeat(np.array([40, 3, 17, 8, 25]), sizes)
    rng.shuffle(templates)  # a template's images need not be adjacent
    media = templates * 10 + rng.integers(0, 3, len(templates))
    features = rng.normal(size=(len(templates), 16)).astype(np.float32) * 5
    style = rng.normal(size=(len(templates), 6, 2)).astype(np.float32)
    return features, templates, media, style


def expected(features, templates, media, method):
    fuser = get_method(method).build(None)
    ids = np.unique(templates)
    out = []
    for t in ids:
        rows = np.flatnonzero(templates == t)
        template = Template(torch.from_numpy(features[rows]), torch.from_numpy(media[rows]), None)
        out.append(F.normalize(fuser(template), dim=-1).numpy())
    return ids, np.stack(out)


def read_output(path):
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["templates"], data["descriptors"]
    from safetensors.numpy import load_file

    data = load_file(str(path))
    return data["templates"], data["descriptors"]


@pytest.mark.parametrize("layout", ["npy+ids", "npy+tid_mid", "npz", "safetensors"])
@pytest.mark.parametrize("method", ["mean", "media-mean", "norm-mean", "core-mean"])
def test_fuses_every_format(tmp_path, images, layout, method):
    features, templates, media, style = images
    args = ["fuse", "--method", method, "--no-progress"]
    if layout.startswith("npy"):
        np.save(tmp_path / "f.npy", features)
        args += ["--features", str(tmp_path / "f.npy")]
        if layout == "npy+ids":
            np.save(tmp_path / "t.npy", np.stack([templates, media], 1))
            args += ["--templates", str(tmp_path / "t.npy")]
        else:
            lines = [
                f"img{i}.jpg {t} {m}\n"
                for i, (t, m) in enumerate(zip(templates, media, strict=True))
            ]
            (tmp_path / "x_face_tid_mid.txt").write_text("".join(lines))
            args += ["--templates", str(tmp_path / "x_face_tid_mid.txt")]
    elif layout == "npz":
        np.savez(
            tmp_path / "f.npz", features=features, templates=templates, media=media, style=style
        )
        args += ["--features", str(tmp_path / "f.npz")]
    else:
        from safetensors.numpy import save_file

        bundle = {"features": features, "templates": templates, "media": media, "style": style}
        save_file(bundle, str(tmp_path / "f.safetensors"))
        args += ["--features", str(tmp_path / "f.safetensors")]
    out = tmp_path / ("out.npz" if layout != "safetensors" else "out.safetensors")
    assert main([*args, "--out", str(out)]) == 0
    ids, descriptors = read_output(out)
    want_ids, want = expected(features, templates, media, method)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(descriptors, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1, rtol=1e-5)


def files_under(directory):
    """Every file and directory under ``directory``, hidden ones too, with the bytes of files."""
    return {
        p.relative_to(directory): p.read_bytes() if p.is_file() else None
        for p in directory.rglob("*")
    }


def refused(argv, capsys, tmp_path, pattern):
    """``fusedset fuse argv`` ends with one line holding ``pattern`` and exit code 2, and leaves
    tmp_path as it found it: no output, no temporary file, every input as it was."""
    before = files_under(tmp_path)
    assert main(["fuse", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err
    assert files_under(tmp_path) == before


def _fails(args, capsys, tmp_path, pattern):
    refused(
        ["--method", "mean", *args, "--out", str(tmp_path / "out.npz")], capsys, tmp_path, pattern
    )


def test_missing_features_file(tmp_path, capsys):
    missing = tmp_path / "nope.npy"
    _fails(
        ["--features", str(missing), "--templates", str(missing)],
        capsys,
        tmp_path,
        f"{missing}: no such features file",
    )


def test_npy_without_templates(tmp_path, capsys, images):
    np.save(tmp_path / "f.npy", images[0])
    _fails(["--features", str(tmp_path / "f.npy")], capsys, tmp_path, "needs --templates")


def test_mismatched_template_ids(tmp_path, capsys, images):
    np.save(tmp_path / "f.npy", images[0])
    np.save(tmp_path / "t.npy", images[1][:-1])
    _fails(
        ["--features", str(tmp_path / "f.npy"), "--templates", str(tmp_path / "t.npy")],
        capsys,
        tmp_path,
        "expected 33 template ids",
    )


def test_bundle_without_templates(tmp_path, capsys, images):
    np.savez(tmp_path / "f.npz", features=images[0])
    _fails(
        ["--features", str(tmp_path / "f.npz")],
        capsys,
        tmp_path,
        "missing array 'templates' (has features)",
    )


def test_nan_features_leave_no_output(tmp_path, capsys, images):
    features, templates, media, _ = images
    features = features.copy()
    features[np.flatnonzero(templates == 17)[1], 4] = np.nan
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    _fails(
        ["--features", str(tmp_path / "f.npz")],
        capsys,
        tmp_path,
        "template 17 has NaN or Inf features",
    )


def test_output_must_be_npz_or_safetensors(tmp_path, capsys, images):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    code = main(
        [
            "fuse",
            "--method",
            "mean",
            "--features",
            str(tmp_path / "f.npz"),
            "--out",
            str(tmp_path / "o.csv"),
        ]
    )
    assert code == 2
    assert "the output must be .npz or .safetensors" in capsys.readouterr().err


# -- learned methods: caface and coreset from a checkpoint ---------------------------------------


@pytest.fixture
def modules(images):
    """Random modules; the test leaves the global torch generator as it found it, although
    loading a checkpoint draws from it (the module is built with random weights first)."""
    features, _, _, style = images
    with torch.random.fork_rng(devices=[]):
        yield random_modules(features.shape[1], style.shape[1], seed=7)


def write_inputs(tmp_path, images, layout):
    """The images in ``layout``; -> the fuse arguments that read them."""
    features, templates, media, style = images
    if layout.startswith("npy"):
        np.save(tmp_path / "f.npy", features)
        np.save(tmp_path / "f_style.npy", style)  # found next to the features
        if layout == "npy+ids":
            np.save(tmp_path / "t.npy", np.stack([templates, media], 1))
            return ["--features", str(tmp_path / "f.npy"), "--templates", str(tmp_path / "t.npy")]
        lines = [
            f"img{i}.jpg {t} {m}\n" for i, (t, m) in enumerate(zip(templates, media, strict=True))
        ]
        (tmp_path / "x_face_tid_mid.txt").write_text("".join(lines))
        return [
            "--features",
            str(tmp_path / "f.npy"),
            "--templates",
            str(tmp_path / "x_face_tid_mid.txt"),
        ]
    bundle = {"features": features, "templates": templates, "media": media, "style": style}
    if layout == "npz":
        np.savez(tmp_path / "f.npz", **bundle)
        return ["--features", str(tmp_path / "f.npz")]
    from safetensors.numpy import save_file

    save_file(bundle, str(tmp_path / "f.safetensors"))
    return ["--features", str(tmp_path / "f.safetensors")]


def expected_learned(images, method, model, chunk_size):
    """Each template's descriptor from the in-memory module, the template whole."""
    features, templates, _, style = images
    ids = np.unique(templates)
    out = []
    with torch.no_grad():
        for t in ids:
            rows = np.flatnonzero(templates == t)
            x = torch.from_numpy(features[rows])[None]
            if method == "caface":
                stream = model.stream(1, "official", chunk_size)
                fused = stream.update(x, torch.from_numpy(style[rows])[None]).result()
            else:
                fused = model.forward_features(x)[0]
            out.append(F.normalize(fused[0], dim=-1).numpy())
    return ids, np.stack(out)


@pytest.mark.parametrize("layout", ["npy+ids", "npy+tid_mid", "npz", "safetensors"])
@pytest.mark.parametrize("method", ["caface", "coreset"])
def test_learned_methods_fuse_every_format(tmp_path, images, modules, layout, method):
    checkpoint = write_checkpoint(tmp_path / "w.pt", method, modules[method], "trained")
    out = tmp_path / "out.npz"
    args = ["fuse", "--method", method, "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*args, *write_inputs(tmp_path, images, layout), "--out", str(out)]) == 0
    ids, descriptors = read_output(out)
    want_ids, want = expected_learned(images, method, modules[method], 256)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(descriptors, want, rtol=1e-4, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("method", ["media-mean", "core-mean", "caface", "coreset"])
def test_fuses_on_cuda_as_on_cpu(tmp_path, images, modules, method):
    args = ["fuse", "--method", method, "--no-progress", *write_inputs(tmp_path, images, "npz")]
    if method in modules:
        checkpoint = write_checkpoint(tmp_path / "w.pt", method, modules[method], "trained")
        args += ["--checkpoint", str(checkpoint)]
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.npz"
        assert main([*args, "--device", device, "--out", str(outputs[device])]) == 0
    cpu, cuda = read_output(outputs["cpu"]), read_output(outputs["cuda"])
    np.testing.assert_array_equal(cuda[0], cpu[0])
    np.testing.assert_allclose(cuda[1], cpu[1], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_device_is_refused(tmp_path, images, capsys):
    args = ["--method", "mean", *write_inputs(tmp_path, images, "npz"), "--device", "cuda"]
    refused([*args, "--out", str(tmp_path / "o.npz")], capsys, tmp_path,
            "--device cuda: torch sees no CUDA device")  # fmt: skip


@pytest.mark.parametrize("layout", ["bare", "lightning"])
@pytest.mark.parametrize("method", ["caface", "coreset"])
def test_released_checkpoint_layouts_load(tmp_path, images, modules, layout, method):
    checkpoint = write_checkpoint(tmp_path / "w.pt", method, modules[method], layout)
    out = tmp_path / "out.npz"
    args = ["fuse", "--method", method, "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*args, *write_inputs(tmp_path, images, "npz"), "--out", str(out)]) == 0
    np.testing.assert_allclose(
        read_output(out)[1],
        expected_learned(images, method, modules[method], 256)[1],
        rtol=1e-4,
        atol=1e-5,
    )


def test_caface_streams_a_template_in_chunks_of_the_given_size(tmp_path, images, modules):
    checkpoint = write_checkpoint(tmp_path / "w.pt", "caface", modules["caface"], "bare")
    args = ["fuse", "--method", "caface", "--checkpoint", str(checkpoint), "--no-progress"]
    args += write_inputs(tmp_path, images, "npy+ids")
    assert main([*args, "--chunk", "3", "--out", str(tmp_path / "c3.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "whole.npz")]) == 0
    chunked, whole = read_output(tmp_path / "c3.npz")[1], read_output(tmp_path / "whole.npz")[1]
    np.testing.assert_allclose(
        chunked, expected_learned(images, "caface", modules["caface"], 3)[1], rtol=1e-4, atol=1e-5
    )
    # Templates of at most 3 frames are one chunk either way; the others are clustered per chunk.
    sizes = np.unique(images[1], return_counts=True)[1]
    same = np.isclose(chunked, whole, rtol=1e-4, atol=1e-5).all(axis=1)
    np.testing.assert_array_equal(same, sizes <= 3)


def _fails_learned(tmp_path, capsys, images, method, checkpoint, pattern, layout="npz"):
    args = ["--method", method, "--checkpoint", str(checkpoint)]
    args += [*write_inputs(tmp_path, images, layout), "--out", str(tmp_path / "out.npz")]
    refused(args, capsys, tmp_path, pattern)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("given", "method"), [("caface", "coreset"), ("coreset", "caface")])
def test_a_checkpoint_of_the_other_method_is_refused(
    tmp_path, capsys, images, modules, layout, given, method
):
    checkpoint = write_checkpoint(tmp_path / "w.pt", given, modules[given], layout)
    names = {"caface": "CAFace", "coreset": "FaceCoresetNet"}
    _fails_learned(
        tmp_path,
        capsys,
        images,
        method,
        checkpoint,
        f"{checkpoint}: holds {names[given]} weights ({given}), "
        f"not {names[method]} weights ({method})",
    )


@pytest.mark.parametrize("method", ["caface", "coreset"])
def test_missing_unreadable_and_foreign_checkpoints(tmp_path, capsys, images, method):
    missing = tmp_path / "nope.pt"
    _fails_learned(tmp_path, capsys, images, method, missing, f"{missing}: no such checkpoint file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(500))
    _fails_learned(
        tmp_path,
        capsys,
        images,
        method,
        garbage,
        f"{garbage}: not a checkpoint that torch.load(weights_only=True) reads",
    )
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.randn(3), tensor)
    _fails_learned(
        tmp_path,
        capsys,
        images,
        method,
        tensor,
        f"{tensor}: expected a state dict or a checkpoint dict, found Tensor",
    )
    foreign = tmp_path / "foreign.pt"
    torch.save({"backbone.weight": torch.randn(2, 2)}, foreign)
    name = {"caface": "CAFace", "coreset": "FaceCoresetNet"}[method]
    _fails_learned(
        tmp_path,
        capsys,
        images,
        method,
        foreign,
        f"{foreign}: not a {name} checkpoint (cannot infer",
    )


def test_a_checkpoint_with_missing_keys_names_them(tmp_path, capsys, images, modules):
    state = modules["coreset"].state_dict()
    del state["decoder_layer1.norm2.bias"]
    torch.save(state, tmp_path / "w.pt")
    _fails_learned(
        tmp_path,
        capsys,
        images,
        "coreset",
        tmp_path / "w.pt",
        "not a FaceCoresetNet checkpoint (1 missing keys such as 'decoder_layer1.norm2.bias')",
    )


def test_caface_nan_in_a_later_chunk_leaves_no_output(tmp_path, capsys, images, modules):
    features, templates, media, style = images
    features = features.copy()
    features[np.flatnonzero(templates == 8)[-1], 2] = np.nan  # the last chunk of template 8
    checkpoint = write_checkpoint(tmp_path / "w.pt", "caface", modules["caface"], "trained")
    out = tmp_path / "out.npz"
    args = ["fuse", "--method", "caface", "--checkpoint", str(checkpoint), "--chunk", "4"]
    args += write_inputs(tmp_path, (features, templates, media, style), "npy+ids")
    assert main([*args, "--no-progress", "--out", str(out)]) == 2
    assert "template 8 has NaN or Inf features" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method", ["caface", "coreset"])
def test_learned_method_nan_features_and_style(tmp_path, capsys, images, modules, method):
    features, templates, media, style = images
    checkpoint = write_checkpoint(tmp_path / "w.pt", method, modules[method], "trained")
    bad = features.copy()
    bad[np.flatnonzero(templates == 3)[0], 0] = np.inf
    _fails_learned(
        tmp_path,
        capsys,
        (bad, templates, media, style),
        method,
        checkpoint,
        "template 3 has NaN or Inf features",
    )
    if method == "caface":
        bad_style = style.copy()
        bad_style[np.flatnonzero(templates == 17)[1], 2, 1] = np.nan
        _fails_learned(
            tmp_path,
            capsys,
            (features, templates, media, bad_style),
            method,
            checkpoint,
            "template 17: CAFace: style_stats holds NaN or Inf",
        )


def test_learned_method_usage_errors(tmp_path, capsys, images, modules):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    base = ["fuse", "--features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o.npz")]
    assert main([*base, "--method", "coreset"]) == 2
    assert "method 'coreset' needs --checkpoint" in capsys.readouterr().err
    checkpoint = write_checkpoint(tmp_path / "w.pt", "caface", modules["caface"], "bare")
    assert main([*base, "--method", "caface", "--checkpoint", str(checkpoint)]) == 2
    assert "f.npz: method 'caface' needs style statistics" in capsys.readouterr().err
    assert main([*base, "--method", "mean", "--chunk", "8"]) == 2
    assert "method 'mean' does not stream in chunks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--method", "caface", "--checkpoint", str(checkpoint), "--chunk", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
    # A model of another width than the features.
    wide = random_modules(32, 6)["coreset"]
    write_checkpoint(tmp_path / "wide.pt", "coreset", wide, "bare")
    assert main([*base, "--method", "coreset", "--checkpoint", str(tmp_path / "wide.pt")]) == 2
    err = capsys.readouterr().err
    assert "f.npz: template 3: features must have shape (B, N, 32), got (1, 7, 16)" in err, err
    assert not (tmp_path / "o.npz").exists()


# -- issue 14: every bad input ends in one line and exit code 2, and nothing is written ---------


def coreset_checkpoint_with(tmp_path, modules, key, spoil):
    state = modules["coreset"].state_dict()
    state[key] = spoil(state[key])
    torch.save(state, tmp_path / "w.pt")
    return tmp_path / "w.pt"


def with_nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


@pytest.mark.parametrize(
    ("key", "spoil", "problem"),
    [
        (
            "decoder_layer1.norm1.weight",
            lambda t: torch.ones(t.shape[0] + 1),
            "'decoder_layer1.norm1.weight' has shape (17,), the released FaceCoresetNet "
            "expects shape (16,)",
        ),
        (
            "decoder_layer1.norm1.bias",
            lambda t: t[0],
            "'decoder_layer1.norm1.bias' has shape (), the released FaceCoresetNet",
        ),
        (
            "pos_trans_norm.weight",
            lambda t: t[0],
            "cannot infer the FaceCoresetNet width: 'pos_trans_norm.weight' must be a vector, "
            "got ()",
        ),
        ("decoder_layer1.self_attn1.in_proj_weight", with_nan, "in_proj_weight' holds NaN or Inf"),
    ],
    ids=["wrong_width", "0d", "0d_width_key", "nan"],
)
def test_a_checkpoint_tensor_of_the_wrong_shape_or_nan_is_named(
    tmp_path, capsys, images, modules, key, spoil, problem
):
    checkpoint = coreset_checkpoint_with(tmp_path, modules, key, spoil)
    _fails_learned(tmp_path, capsys, images, "coreset", checkpoint, f"{checkpoint}: ")
    _fails_learned(tmp_path, capsys, images, "coreset", checkpoint, problem)


def test_caface_checkpoint_tensors_are_checked_too(tmp_path, capsys, images, modules):
    state = modules["caface"].state_dict()
    for key, spoil, problem in [
        ("style_maker.cfc", with_nan, "'style_maker.cfc' holds NaN or Inf"),
        (
            "fusion_net.clustering_layer.group_token",
            lambda t: t[0],
            "'fusion_net.clustering_layer.group_token' must have 3 dimensions, got (",
        ),
    ]:
        torch.save({**state, key: spoil(state[key])}, tmp_path / "w.pt")
        _fails_learned(tmp_path, capsys, images, "caface", tmp_path / "w.pt", problem)


@pytest.mark.parametrize("method", ["coreset", "mean", "caface"])
def test_an_all_zero_template_is_refused_not_written_as_nan(
    tmp_path, capsys, images, modules, method
):
    features, templates, media, style = images
    zero = features.copy()
    zero[templates == 17] = 0
    argv = ["--method", method, *write_inputs(tmp_path, (zero, templates, media, style), "npz")]
    if method in modules:
        checkpoint = write_checkpoint(tmp_path / "w.pt", method, modules[method], "bare")
        argv += ["--checkpoint", str(checkpoint)]
    kind = "NaN or Inf" if method == "coreset" else "zero"
    refused(
        [*argv, "--out", str(tmp_path / "out.npz")],
        capsys,
        tmp_path,
        f"f.npz: template 17: its fused descriptor is {kind}, a direction cannot be written",
    )


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, images):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    (tmp_path / "plain").write_text("a regular file")
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "alias.npz").hardlink_to(tmp_path / "f.npz")
    base = ["--method", "mean", "--features", str(tmp_path / "f.npz"), "--out"]
    for out, problem in [
        ("plain/out.npz", f"cannot write under {tmp_path / 'plain'}, a file, not a directory"),
        ("plain/sub/out.npz", f"cannot write under {tmp_path / 'plain'}, a file"),
        ("dir.npz", "the output is an existing directory"),
        ("f.npz", "the output is an input file; it is never overwritten"),
        ("alias.npz", "the output is an input file"),
        ("out.csv", "the output must be .npz or .safetensors"),
    ]:
        refused([*base, str(tmp_path / out)], capsys, tmp_path, f"{tmp_path / out}: {problem}")


def test_the_output_may_replace_an_earlier_output_and_create_its_directory(tmp_path, images):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    out = tmp_path / "new" / "dir" / "out.safetensors"
    args = ["fuse", "--method", "mean", "--no-progress", "--features", str(tmp_path / "f.npz")]
    assert main([*args, "--out", str(out)]) == 0
    out.write_bytes(b"an earlier run")
    assert main([*args, "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_output(out)[0], np.unique(templates))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.safetensors"]


@pytest.mark.parametrize(
    ("ids", "problem"),
    [
        (lambda t: t + 0.5, "templates must be integers, got 3.5 (dtype float64)"),
        (lambda t: np.where(t == 8, np.nan, t), "templates must be integers, got nan"),
        (lambda t: t * 1e20, "templates must be integers, got 3e+20 (dtype float64)"),
        (lambda t: t > 10, "templates must be integers, got dtype bool"),
        (lambda t: t + 0j, "templates must be integers, got dtype complex128"),
    ],
    ids=["fraction", "nan", "too_large", "bool", "complex"],
)
def test_template_ids_that_are_not_integers_are_refused(tmp_path, capsys, images, ids, problem):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=ids(templates), media=media)
    _fails(["--features", str(tmp_path / "f.npz")], capsys, tmp_path, f"f.npz: {problem}")


def test_whole_float_ids_are_read_and_fractional_text_ids_refused(tmp_path, capsys, images):
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates.astype(np.float64))
    out = tmp_path / "o.npz"
    argv = ["fuse", "--method", "mean", "--no-progress", "--features", str(tmp_path / "f.npz")]
    assert main([*argv, "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_output(out)[0], np.unique(templates))
    out.unlink()
    np.save(tmp_path / "f.npy", features)
    lines = [
        f"img{i}.jpg {t}.5 {m}\n" for i, (t, m) in enumerate(zip(templates, media, strict=True))
    ]
    (tmp_path / "x_face_tid_mid.txt").write_text("".join(lines))
    argv = [
        "--features",
        str(tmp_path / "f.npy"),
        "--templates",
        str(tmp_path / "x_face_tid_mid.txt"),
    ]
    _fails(argv, capsys, tmp_path, "x_face_tid_mid.txt: template ids must be integers (")


KILLED_WHILE_WRITING = """
import os, signal, sys
import numpy as np

savez = np.savez


def savez_then_die(file, **arrays):
    savez(file, **arrays)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)


np.savez = savez_then_die
from fusedset.cli import main

main(sys.argv[1:])
"""


def test_killed_while_writing_the_output_leaves_no_file(tmp_path, images):
    """SIGKILL runs no cleanup: only a file that never had a name leaves nothing behind."""
    import signal
    import subprocess
    import sys

    features, templates, media, _ = images
    work = tmp_path / "work"
    work.mkdir()
    np.savez(work / "f.npz", features=features, templates=templates, media=media)
    before = files_under(work)
    argv = ["fuse", "--method", "mean", "--no-progress", "--features", str(work / "f.npz")]
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, *argv, "--out", str(work / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert files_under(work) == before


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "hidden_name"])
def test_a_write_that_fails_leaves_no_file(tmp_path, capsys, images, monkeypatch, unnamed):
    """Both ways of writing: the unnamed file, and the hidden temporary name of systems
    without O_TMPFILE, removed when the write fails."""
    import fusedset.fuse

    if not unnamed:
        monkeypatch.setattr(fusedset.fuse, "_unnamed_file", lambda directory: None)
    features, templates, media, _ = images
    np.savez(tmp_path / "f.npz", features=features, templates=templates, media=media)
    argv = ["fuse", "--method", "mean", "--no-progress", "--features", str(tmp_path / "f.npz")]
    assert main([*argv, "--out", str(tmp_path / "ok.npz")]) == 0
    np.testing.assert_array_equal(read_output(tmp_path / "ok.npz")[0], np.unique(templates))

    def disk_full(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    refused(
        [*argv[1:], "--out", str(tmp_path / "out.npz")],
        capsys,
        tmp_path,
        "out.npz: cannot write (No space left on device)",
    )
