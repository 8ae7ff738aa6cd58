"""``fusedset fuse`` end to end on small generated files in each format, and its error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedset.cli import main
from fusedset.eval.fusion import Template, get_method

from .checkpoints import LAYOUTS, random_modules, write_checkpoint


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


def _fails(args, capsys, tmp_path, pattern):
    out = tmp_path / "out.npz"
    assert main(["fuse", "--method", "mean", "--no-progress", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary file left"


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
        yield random_modules(
            features.shape[1], style.shape[1], seed=int(np.random.default_rng().integers(2**31))
        )


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
    out = tmp_path / "out.npz"
    args = ["fuse", "--method", method, "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*args, *write_inputs(tmp_path, images, layout), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary file left"


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
    garbage.write_bytes(np.random.default_rng().bytes(500))
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
