"""``fusedset fuse`` end to end on small generated files in each format, and its error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedset.cli import main
from fusedset.eval.fusion import Template, get_method


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
