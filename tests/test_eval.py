"""Metrics, fusion baselines, the method registry, evaluation and the eval/data commands."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from fusedset import methods
from fusedset.cli import main
from fusedset.data import write_benchmark
from fusedset.data.synthetic import SynthConfig, generate
from fusedset.eval import metrics
from fusedset.eval.run import evaluate, format_table, pair_scores
from fusedset.methods import Method, Template, registry
from fusedset.methods.baselines import core_indices

from .checkpoints import random_modules, write_checkpoint
from .helpers import torch_threads

BASELINES = ["mean", "media-mean", "norm-mean", "core-mean"]
TINY = SynthConfig(enrolled=12, unenrolled=4, frames_median=10.0, frames_range=(4, 40))


@pytest.fixture
def one_thread():
    """Per-template ops are tiny: on a shared 2-core machine, intra-op threads only add waits.
    Restored afterwards, since the setting is process-wide (and ``fusedset eval`` changes it)."""
    with torch_threads(1):
        yield


def brute_force_tar(labels, scores, far):
    """Largest TPR over every threshold t (accept score >= t) with FP count <= far * negatives."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    best = 0.0
    for t in [np.inf, *np.unique(scores)]:
        if (negatives >= t).sum() <= far * len(negatives):
            best = max(best, (positives >= t).mean())
    return best


@pytest.mark.parametrize("negatives", [1000, 4321])
def test_tar_at_far_matches_brute_force(negatives):
    rng = np.random.default_rng(negatives)
    labels = np.r_[np.ones(300), np.zeros(negatives)].astype(int)
    # Rounding makes ties, within and across the classes.
    scores = np.round(np.r_[rng.normal(1.5, 1, 300), rng.normal(0, 1, negatives)], 2)
    fars = (1e-3, 2e-3, 1e-2, 0.0123, 1e-1, 0.5)
    got = metrics.tar_at_far(labels, scores, fars)
    for far in fars:
        assert got[far] == pytest.approx(brute_force_tar(labels, scores, far), abs=1e-12), far


def test_roc_is_sklearn_with_every_threshold():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels, 1.0), 1)
    fpr, tpr = metrics.roc(labels, scores)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    # sklearn's default curve is a subset of these points.
    dropped_fpr, dropped_tpr, _ = roc_curve(labels, scores)
    points = set(zip(fpr.tolist(), tpr.tolist(), strict=True))
    assert set(zip(dropped_fpr.tolist(), dropped_tpr.tolist(), strict=True)) <= points


def test_identification_matches_brute_force():
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    gallery_subjects = np.array([1, 2, 3, 4, 5, 6, 6])  # subject 6 has two templates
    gallery = unit(rng.normal(size=(7, 8)))
    probe_subjects = np.r_[rng.integers(1, 7, 40), np.arange(100, 160)]  # 60 non-mated
    probes = unit(
        rng.normal(size=(100, 8)) + 1.5 * np.r_[gallery[probe_subjects[:40] - 1], np.zeros((60, 8))]
    )
    got = metrics.identification(
        probes, probe_subjects, gallery, gallery_subjects, fpir=0.05, chunk=32
    )

    similarity = probes @ gallery.T
    ranks, top, correct = [], [], []
    for i, subject in enumerate(probe_subjects):
        best = {s: similarity[i, gallery_subjects == s].max() for s in np.unique(gallery_subjects)}
        order = sorted(best, key=lambda s: -best[s])
        top.append(best[order[0]])
        if subject in best:
            ranks.append(1 + sum(v > best[subject] for v in best.values()))
            correct.append(order[0] == subject)
    ranks, top = np.array(ranks), np.array(top)
    assert got.mated == 40
    assert got.non_mated == 60
    assert got.ranks[1] == pytest.approx((ranks <= 1).mean())
    assert got.ranks[5] == pytest.approx((ranks <= 5).mean())
    mated_top, non_mated_top = top[:40][np.array(correct)], top[40:]
    best_tpir = 0.0
    for t in [np.inf, *np.unique(top)]:
        if (non_mated_top >= t).sum() <= 0.05 * 60:
            best_tpir = max(best_tpir, (mated_top >= t).sum() / 40)
    assert got.tpir == pytest.approx(best_tpir)


def test_pair_scores_in_blocks():
    rng = np.random.default_rng(2)
    descriptors = rng.normal(size=(30, 4))
    first, second = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    expected = (descriptors[first] * descriptors[second]).sum(axis=1)
    np.testing.assert_allclose(pair_scores(descriptors, first, second, block=7), expected)


def test_closed_set_has_no_tpir():
    eye = np.eye(3)
    got = metrics.identification(eye, np.array([1, 2, 3]), eye, np.array([1, 2, 3]))
    assert got.ranks == {1: 1.0, 5: 1.0}
    assert got.tpir is None


def test_quality_fps_against_brute_force():
    torch.manual_seed(0)
    features = torch.randn(50, 16) * torch.rand(50, 1) * 10
    features[7] = features[3]  # an exact duplicate must not be chosen twice
    for gamma in (0.0, 1.0, 2.0):
        got = core_indices(features, k=5, gamma=gamma).tolist()
        norms = features.norm(dim=1)
        unit = features / norms[:, None]
        chosen = [int(norms.argmax())]
        while len(chosen) < 5:
            score = [
                -1.0
                if i in chosen
                else float((norms[i] / norms.max()) ** gamma)
                * min(float(1 - unit[i] @ unit[c]) / 2 for c in chosen)
                for i in range(50)
            ]
            chosen.append(int(np.argmax(score)))
        assert got == chosen
    assert core_indices(features[:2], k=3).tolist() == [
        int(norms[:2].argmax()),
        1 - int(norms[:2].argmax()),
    ]
    duplicates = torch.ones(4, 3)
    assert sorted(core_indices(duplicates, k=3).tolist()) == [0, 1, 2]


def test_baselines_on_a_known_template():
    features = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    template = Template(features=features, media=torch.tensor([5, 5, 9]), style=None)
    torch.testing.assert_close(methods.mean(template), torch.tensor([2 / 3, 1 / 3]))
    # Media 5 (two frames) and media 9 (one still) weigh the same.
    torch.testing.assert_close(methods.media_mean(template), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(methods.norm_mean(template), torch.tensor([2.0, 1 / 3]))
    # Core of 2: the largest norm, then the only image in another direction.
    torch.testing.assert_close(methods.core_mean(template, k=2), torch.tensor([0.5, 0.5]))


def test_registry():
    assert methods.method_names()[:4] == BASELINES
    assert methods.get_method("norm-mean").build(None) is methods.norm_mean
    assert methods.method_names()[4:] == ["caface", "coreset"]
    assert methods.get_method("caface").needs_style
    assert not methods.get_method("coreset").needs_style
    # The module's name for the method answers too, and is not listed twice.
    assert methods.get_method("facecoresetnet") is methods.get_method("coreset")
    assert methods.canonical_name("facecoresetnet") == "coreset"
    with pytest.raises(KeyError, match="unknown fusion method 'median'"):
        methods.get_method("median")
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method(Method("mean", build=lambda c: methods.mean, description=""))


def test_evaluation_is_deterministic_and_runs_registered_methods(monkeypatch, one_thread):
    bench = generate(TINY, seed=3)
    built_with = []

    def build_first_image(checkpoint):
        built_with.append(checkpoint)
        return lambda t: t.features[0]

    monkeypatch.setitem(
        registry._METHODS,
        "first-image",
        Method("first-image", build_first_image, "first image", needs_checkpoint=True),
    )
    names = [*BASELINES, "first-image"]
    runs = [
        evaluate(bench.meta, bench.features, bench.style, names, {"first-image": "w.pt"})
        for _ in range(2)
    ]
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "fuse_seconds"}  # noqa: E731
    assert [strip(r) for r in runs[0]] == [strip(r) for r in runs[1]]
    assert built_with == ["w.pt", "w.pt"]
    assert [r.method for r in runs[0]] == names
    with pytest.raises(ValueError, match="'first-image' needs a checkpoint"):
        evaluate(bench.meta, bench.features, bench.style, ["first-image"])


def test_default_benchmark_norm_and_core_mean_beat_plain_averaging(one_thread):
    bench = generate(seed=0)
    results = evaluate(bench.meta, bench.features, bench.style, BASELINES)
    print("\n" + format_table(results))
    tar = {r.method: r.tar[1e-3] for r in results}
    rank1 = {r.method: r.identification.ranks[1] for r in results}
    assert tar["norm-mean"] > tar["mean"] + 0.05
    assert tar["core-mean"] > tar["mean"] + 0.05
    assert rank1["core-mean"] > rank1["mean"] + 0.05
    # Clearly beatable: room above plain averaging for learned methods.
    assert tar["mean"] < 0.8


def test_cli_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    argv = ["data", "synth", "--out", str(out), "--seed", "1", "--enrolled", "12"]
    argv += ["--unenrolled", "4", "--frames-median", "10", "--frames-max", "40"]
    assert main(argv) == 0
    assert "fusedset eval --meta" in capsys.readouterr().out
    features = out / "synth_features.npy"
    assert (out / "synth_features_style.npy").is_file()

    report = tmp_path / "report"
    argv = ["eval", "--meta", str(out / "meta"), "--features", str(features), "--out", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["method", "TAR@1e-05", "TAR@0.0001"]
    assert "TPIR@0.01" in printed
    results = json.loads((report / "results.json").read_text())
    assert [r["method"] for r in results] == BASELINES  # learned methods need --checkpoint
    assert set(results[0]["tar_at_far"]) == {"1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert (report / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same benchmark evaluated in memory gives the same numbers as through the files.
    bench = generate(replace(TINY, enrolled=12, unenrolled=4), seed=1)
    in_memory = evaluate(bench.meta, bench.features, bench.style, ["mean"])[0]
    assert results[0]["tar_at_far"]["0.01"] == in_memory.tar[1e-2]

    np.save(tmp_path / "short.npy", np.load(features)[:-1])
    short = ["eval", "--meta", str(out / "meta"), "--features", str(tmp_path / "short.npy")]
    assert main(short) == 2
    assert "the features have" in capsys.readouterr().err

    (out / "meta" / "synth_template_pair_label.txt").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"meta file not found: {out / 'meta' / 'synth_template_pair_label.txt'}" in err

    argv = ["eval", "--meta", str(out / "meta"), "--features", str(features), "--method", "median"]
    assert main(argv) == 2
    assert "unknown method 'median'" in capsys.readouterr().err


# -- learned methods in the evaluation -----------------------------------------------------------


@pytest.fixture
def tiny_benchmark(tmp_path):
    bench = generate(TINY, seed=5)
    features = write_benchmark(tmp_path / "bench", bench.meta, bench.features, bench.style)
    modules = random_modules(
        TINY.dim, TINY.style_channels, seed=int(np.random.default_rng().integers(2**31))
    )
    checkpoints = {
        m: write_checkpoint(tmp_path / f"{m}.pt", m, modules[m], "trained") for m in modules
    }
    # Loading a checkpoint draws from the global torch generator (the module is built with
    # random weights first): the test leaves it as it found it.
    with torch.random.fork_rng(devices=[]):
        yield bench, features, checkpoints


def test_learned_methods_evaluate_deterministically(tiny_benchmark, one_thread):
    bench, _, checkpoints = tiny_benchmark
    paths = {m: str(p) for m, p in checkpoints.items()}
    methods = ["mean", "caface", "coreset"]
    runs = [evaluate(bench.meta, bench.features, bench.style, methods, paths) for _ in range(2)]
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "fuse_seconds"}  # noqa: E731
    # Dropout or the training-mode (Gumbel) selection left on would change the second run.
    assert [strip(r) for r in runs[0]] == [strip(r) for r in runs[1]]
    assert [r.method for r in runs[0]] == methods


def test_eval_checkpoint_argument(tiny_benchmark, tmp_path, capsys, one_thread):
    _, features, checkpoints = tiny_benchmark
    base = ["eval", "--meta", str(features.parent / "meta"), "--features", str(features)]
    caface, coreset = str(checkpoints["caface"]), str(checkpoints["coreset"])

    def methods_run(argv):
        assert main(argv) == 0, capsys.readouterr().err
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]

    assert methods_run([*base, "--checkpoint", f"caface={caface}", f"coreset={coreset}"]) == [
        *BASELINES,
        "caface",
        "coreset",
    ]
    assert methods_run([*base, "--checkpoint", f"coreset={coreset}"]) == [*BASELINES, "coreset"]
    assert methods_run([*base, "--method", "mean", "caface", "--checkpoint", caface]) == [
        "mean",
        "caface",
    ]

    def fails(argv, message):
        out = tmp_path / "report"
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert message in err, err
        assert not out.exists()

    fails([*base, "--checkpoint", caface], "--checkpoint " + caface + ": say which method")
    fails([*base, "--checkpoint", f"mean={caface}"], "method 'mean' takes no checkpoint")
    fails(
        [*base, "--checkpoint", f"caface={caface}", f"caface={caface}"],
        "two checkpoints for 'caface'",
    )
    fails(
        [*base, "--method", "mean", "--checkpoint", f"caface={caface}"],
        "--method does not select 'caface'",
    )
    fails([*base, "--method", "coreset"], "method 'coreset' needs a checkpoint (--checkpoint)")
    fails(
        [*base, "--checkpoint", f"caface={caface}", f"coreset={caface}"],
        f"{caface}: holds CAFace weights (caface), not FaceCoresetNet weights (coreset)",
    )
    fails(
        [*base, "--checkpoint", f"caface={tmp_path / 'missing.pt'}"],
        f"{tmp_path / 'missing.pt'}: no such checkpoint file",
    )
