"""The synthetic surveillance benchmark and the IJB-layout files."""

from dataclasses import replace

import numpy as np
import pytest

from fusedset.data import IJBMeta, MetaFileError, read_features, read_meta, write_benchmark
from fusedset.data.ijb import write_meta
from fusedset.data.synthetic import FACE, NON_FACE, OTHER_IDENTITY, SynthConfig, generate

TINY = SynthConfig(enrolled=10, unenrolled=3, frames_median=12.0, frames_range=(4, 60))


def test_same_seed_same_benchmark_other_seed_other_benchmark():
    a, b, c = generate(TINY, seed=5), generate(TINY, seed=5), generate(TINY, seed=6)
    for name in ("features", "style", "quality", "kind"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("templates", "medias", "pairs"):
        np.testing.assert_array_equal(getattr(a.meta, name), getattr(b.meta, name))
    assert a.features.shape != c.features.shape or not np.array_equal(a.features, c.features)


def test_protocol_structure():
    bench = generate(TINY, seed=1)
    meta = bench.meta
    n = len(meta.templates)
    assert bench.features.shape == (n, TINY.dim)
    assert bench.features.dtype == np.float32
    assert bench.style.shape == (n, TINY.style_channels, 2)
    assert ((bench.quality >= 0) & (bench.quality <= 1)).all()

    gallery = np.concatenate(list(meta.galleries.values()))
    assert sorted(meta.galleries) == ["G1", "G2"]
    assert len(np.unique(gallery[:, 1])) == len(gallery) == TINY.enrolled
    assert len(meta.probes) == TINY.enrolled + TINY.unenrolled
    sizes = dict(zip(*np.unique(meta.templates, return_counts=True), strict=True))
    lo, hi = TINY.gallery_images
    assert all(lo <= sizes[t] <= hi for t in gallery[:, 0])
    assert all(TINY.frames_range[0] <= sizes[t] <= TINY.frames_range[1] for t in meta.probes[:, 0])
    # Every probe is paired with every gallery template; enrolled probes have one genuine pair.
    assert len(meta.pairs) == len(meta.probes) * len(gallery)
    genuine = meta.pairs[meta.pairs[:, 2] == 1]
    assert len(genuine) == TINY.enrolled
    # Gallery stills are one media each; probe frames share media (videos).
    is_gallery = np.isin(meta.templates, gallery[:, 0])
    assert len(np.unique(meta.medias[is_gallery])) == is_gallery.sum()
    assert len(np.unique(meta.medias[~is_gallery])) < (~is_gallery).sum()


def test_norm_direction_and_style_follow_quality():
    bench = generate(replace(TINY, enrolled=60), seed=2)
    q, kinds = bench.quality, bench.kind
    assert {FACE, OTHER_IDENTITY, NON_FACE} <= set(np.unique(kinds).tolist())
    face = kinds == FACE
    norms = np.linalg.norm(bench.features, axis=1)
    assert np.corrcoef(q[face], norms[face])[0, 1] > 0.9
    # Distractors have moderate norms: neither the weakest nor the strongest frames.
    distractor_norms = norms[~face]
    assert np.median(norms[face & (q < 0.15)]) < distractor_norms.mean() < norms[face].max()
    # Darkness lowers the channel means, blur the stds; together they reveal q.
    mean_level = bench.style[..., 0].mean(axis=1)
    std_level = bench.style[..., 1].mean(axis=1)
    assert np.corrcoef(q, mean_level + std_level)[0, 1] > 0.5
    assert np.corrcoef(q, mean_level)[0, 1] > 0.2
    assert np.corrcoef(q, std_level)[0, 1] > 0.2


def test_probe_of_tens_of_thousands_of_frames():
    config = replace(
        TINY,
        enrolled=1,
        unenrolled=0,
        frames_median=20000,
        frames_sigma=0.0,
        frames_range=(4, 20000),
    )
    bench = generate(config, seed=0)
    probe = bench.meta.probes[0, 0]
    assert (bench.meta.templates == probe).sum() == 20000
    # Bursts: the frames of a probe come in far fewer shots and videos than frames.
    assert len(np.unique(bench.meta.medias[bench.meta.templates == probe])) < 20000 / 8


def test_ijb_files_round_trip(tmp_path):
    bench = generate(TINY, seed=4)
    features_path = write_benchmark(tmp_path, bench.meta, bench.features, bench.style)
    meta_dir = tmp_path / "meta"
    assert sorted(p.name for p in meta_dir.iterdir()) == [
        "synth_1N_gallery_G1.csv",
        "synth_1N_gallery_G2.csv",
        "synth_1N_probe_mixed.csv",
        "synth_face_tid_mid.txt",
        "synth_template_pair_label.txt",
    ]
    first = (meta_dir / "synth_face_tid_mid.txt").read_text().splitlines()[0]
    assert first == f"0.jpg {bench.meta.templates[0]} {bench.meta.medias[0]}"
    assert (
        (meta_dir / "synth_1N_probe_mixed.csv")
        .read_text()
        .startswith("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
    )

    meta = read_meta(meta_dir)
    assert meta.prefix == "synth"
    np.testing.assert_array_equal(meta.image_names, bench.meta.image_names)
    for name in ("templates", "medias", "pairs", "probes"):
        np.testing.assert_array_equal(getattr(meta, name), getattr(bench.meta, name))
    assert meta.galleries.keys() == bench.meta.galleries.keys()
    for name, rows in bench.meta.galleries.items():
        np.testing.assert_array_equal(meta.galleries[name], rows)

    features, style = read_features(features_path)
    np.testing.assert_array_equal(features, bench.features)
    assert style.dtype == np.float32
    np.testing.assert_allclose(style, bench.style, rtol=1e-3)


def test_reads_insightface_style_files(tmp_path):
    """Real IJB-C 1:N csv files have more columns and one row per image; 1:N files are optional."""
    (tmp_path / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 69544\n2.jpg 1 3720\n3.jpg 11 3721\n")
    (tmp_path / "ijbc_template_pair_label.txt").write_text("1 11 1\n")
    meta = read_meta(tmp_path)
    assert meta.prefix == "ijbc"
    assert meta.probes is None
    assert meta.galleries == {}
    np.testing.assert_array_equal(meta.medias, [69544, 3720, 3721])

    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SUBJECT_NAME,FACE_X\n"
    (tmp_path / "ijbc_1N_gallery_G1.csv").write_text(header + "1,7,a.jpg,x,3\n1,7,b.jpg,x,4\n")
    (tmp_path / "ijbc_1N_probe_mixed.csv").write_text(header + "11,7,c.jpg,x,5\n")
    meta = read_meta(tmp_path)
    np.testing.assert_array_equal(meta.galleries["G1"], [[1, 7]])
    np.testing.assert_array_equal(meta.probes, [[11, 7]])


def _write_minimal(meta_dir):
    write_meta(
        meta_dir,
        IJBMeta(
            prefix="x",
            image_names=np.array(["a.jpg"]),
            templates=np.array([1]),
            medias=np.array([1]),
            pairs=np.array([[1, 1, 1]]),
            galleries={},
            probes=None,
        ),
    )


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("x_face_tid_mid.txt", "no *_face_tid_mid.txt files in"),
        ("x_template_pair_label.txt", "meta file not found: {dir}/x_template_pair_label.txt"),
    ],
)
def test_missing_meta_file_is_named(tmp_path, remove, message):
    _write_minimal(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(MetaFileError, match=None) as info:
        read_meta(tmp_path)
    assert message.format(dir=tmp_path) in str(info.value)


def test_malformed_files_are_named(tmp_path):
    _write_minimal(tmp_path)
    pairs = tmp_path / "x_template_pair_label.txt"
    pairs.write_text("1 1 1\n1 1\n")
    with pytest.raises(MetaFileError, match=r"x_template_pair_label.txt: .*at row 2"):
        read_meta(tmp_path)
    pairs.write_text("1 one 1\n")
    with pytest.raises(MetaFileError, match=r"x_template_pair_label.txt: could not convert"):
        read_meta(tmp_path)
    pairs.write_text("")
    with pytest.raises(MetaFileError, match=r"x_template_pair_label.txt: no rows"):
        read_meta(tmp_path)
    with pytest.raises(MetaFileError, match="feature file not found"):
        read_features(tmp_path / "missing.npy")
