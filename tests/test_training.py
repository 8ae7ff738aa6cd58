"""``fusedset train``: the training set, the losses lowering, the fused kernels in use, the
checkpoint the learned fusion methods load, and the synthetic training split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusedset.cli import main
from fusedset.data import IJBMeta, MetaFileError, write_benchmark
from fusedset.data.synthetic import FACE, SynthConfig, generate
from fusedset.methods import Template
from fusedset.methods.learned import CAFaceFuser, CoresetFuser, load_module
from fusedset.nn import CAFace, FaceCoresetNet
from fusedset.training import TrainConfig, build_model, train, training_set

from .helpers import torch_threads

SMALL = SynthConfig(enrolled=24, unenrolled=8, frames_median=12.0, frames_range=(4, 48))
# Good frames closer to their identity and less noise shared by a whole template: how a
# module weighs the frames shows in the loss instead of drowning in the noise of the centers,
# which are estimated from 32 identities' templates.
CLEAR = replace(SMALL, identity_cos=(0.0, 0.9), noise_shares=(0.1, 0.6, 0.3))


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small_set():
    bench = generate(CLEAR, seed=11, split="train")
    return training_set(bench.meta, bench.features, bench.style)


def fit_loss(model, method, data):
    """Mean cosine distance to the targets of the eval-mode fusion of every whole template."""
    fuser = CAFaceFuser(model.eval()) if method == "caface" else CoresetFuser(model.eval())
    with torch.no_grad():
        fused = torch.stack(
            [
                fuser(Template(f, torch.zeros(len(f), dtype=torch.int64), s))
                for f, s in zip(data.features, data.style, strict=True)
            ]
        )
    return (1 - F.cosine_similarity(fused, data.targets)).mean().item()


def test_training_set_targets_are_subject_centers():
    rng = np.random.default_rng()
    features = rng.normal(size=(9, 4)).astype(np.float32) * rng.uniform(1, 9, (9, 1))
    templates = np.array([7, 7, 7, 2, 2, 5, 5, 5, 9])  # template 9: no subject, left out
    meta = IJBMeta(
        prefix="x",
        image_names=np.array([f"{i}.jpg" for i in range(9)]),
        templates=templates,
        medias=np.arange(9),
        pairs=np.array([[7, 2, 1]]),
        galleries={"G1": np.array([[2, 100]])},
        probes=np.array([[7, 100], [5, 200]]),
    )
    style = rng.normal(size=(9, 3, 2)).astype(np.float32)
    data = training_set(meta, features, style)

    def direction(rows):
        total = features[rows].astype(np.float64).sum(0)
        return total / np.linalg.norm(total)

    subject_100 = direction([3, 4]) + direction([0, 1, 2])
    subject_100 /= np.linalg.norm(subject_100)
    # Templates in ascending id: 2 and 7 (subject 100), 5 (subject 200).
    np.testing.assert_array_equal(data.features[0], features[[3, 4]])
    np.testing.assert_array_equal(data.features[2], features[[0, 1, 2]])
    np.testing.assert_array_equal(data.style[1], style[[5, 6, 7]])
    np.testing.assert_allclose(data.targets[0], subject_100, rtol=1e-6)
    np.testing.assert_allclose(data.targets[1], direction([5, 6, 7]), rtol=1e-6)
    np.testing.assert_allclose(data.targets[2], subject_100, rtol=1e-6)
    assert len(data.features) == len(data.targets) == 3

    with pytest.raises(MetaFileError, match="training needs subject ids"):
        training_set(
            IJBMeta("x", meta.image_names, templates, meta.medias, meta.pairs, {}, None),
            features,
            None,
        )


@pytest.mark.parametrize(
    ("method", "config", "most"),
    [
        ("caface", TrainConfig(epochs=20, lr=1e-3, batch_size=16), 0.9),
        ("coreset", TrainConfig(epochs=6, lr=1e-3, batch_size=16), 0.8),
    ],
)
def test_training_lowers_the_loss(small_set, one_thread, method, config, most):
    torch.manual_seed(config.seed)
    before = fit_loss(build_model(method, small_set, config), method, small_set)
    result = train(method, small_set, config, progress=False)
    after = fit_loss(result.model, method, small_set)
    assert after < most * before, (before, after)
    losses = result.epoch_losses
    assert len(losses) == config.epochs
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


class FusedOps(TorchDispatchMode):
    """Records the names of the fusedset ops that run."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fusedset":
            self.names.add(func.name().removeprefix("fusedset::"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("method", "kernels"),
    [
        ("caface", {"cluster_accumulate", "cluster_accumulate_backward"}),
        ("coreset", {"quality_fps_select", "quality_fps_backward_dots"}),
    ],
)
def test_training_runs_the_fused_kernels_forward_and_backward(small_set, method, kernels):
    with FusedOps() as ops:
        train(method, small_set, TrainConfig(epochs=1), progress=False)
    assert kernels <= ops.names, ops.names


def test_training_is_reproducible_and_seeded(small_set, one_thread):
    config = TrainConfig(epochs=1, batch_size=16)
    first, again = (train("coreset", small_set, config, progress=False) for _ in range(2))
    other = train("coreset", small_set, TrainConfig(epochs=1, batch_size=16, seed=1), False)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], value, rtol=0, atol=0)
    assert first.epoch_losses == again.epoch_losses != other.epoch_losses


def test_train_command_writes_a_checkpoint_that_fuse_and_eval_take(tmp_path, capsys):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    small = ["--enrolled", "10", "--unenrolled", "3", "--frames-median", "10", "--frames-max", "30"]
    assert main(["data", "synth", "--split", "train", "--out", str(train_dir), *small]) == 0
    assert main(["data", "synth", "--out", str(eval_dir), *small]) == 0
    capsys.readouterr()
    data = ["--features", str(train_dir / "synth_features.npy"), "--meta", str(train_dir / "meta")]
    for method in ("caface", "coreset"):
        out = tmp_path / f"{method}.pt"
        argv = ["train", "--method", method, *data, "--epochs", "2", "--out", str(out)]
        assert main([*argv, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert f"trained {method} on 23 templates" in printed, printed
        stored = torch.load(out, weights_only=True)
        assert stored["fusedset"]["method"] == method
        assert len(stored["fusedset"]["epoch_losses"]) == 2
        loaded = load_module(out, method)
        assert not loaded.training
        # The released loaders read it as they read a Lightning checkpoint.
        official = {"caface": CAFace, "coreset": FaceCoresetNet}[method].from_official(out)
        for name, value in official.state_dict().items():
            torch.testing.assert_close(value, loaded.state_dict()[name], rtol=0, atol=0)

    features = eval_dir / "synth_features.npy"
    tid_mid = eval_dir / "meta" / "synth_face_tid_mid.txt"
    fused = tmp_path / "caface.npz"
    argv = ["fuse", "--method", "caface", "--checkpoint", str(tmp_path / "caface.pt")]
    argv += ["--features", str(features), "--templates", str(tid_mid), "--chunk", "8"]
    assert main([*argv, "--out", str(fused), "--no-progress"]) == 0
    assert f"wrote 23 descriptors of width 512 to {fused}" in capsys.readouterr().out
    with np.load(fused) as out:
        assert out["descriptors"].shape == (23, 512)
        np.testing.assert_allclose(np.linalg.norm(out["descriptors"], axis=1), 1, rtol=1e-5)

    argv = ["eval", "--meta", str(eval_dir / "meta"), "--features", str(features)]
    checkpoints = [f"{m}={tmp_path / f'{m}.pt'}" for m in ("caface", "coreset")]
    assert main([*argv, "--checkpoint", *checkpoints]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == [
        "mean",
        "media-mean",
        "norm-mean",
        "core-mean",
        "caface",
        "coreset",
    ]


def test_train_command_errors(tmp_path, capsys):
    bench = generate(SynthConfig(enrolled=4, unenrolled=1, frames_range=(4, 10)), seed=2)
    features = write_benchmark(tmp_path, bench.meta, bench.features, None)
    argv = ["train", "--features", str(features), "--meta", str(tmp_path / "meta")]
    argv += ["--out", str(tmp_path / "w.pt"), "--no-progress"]
    assert main([*argv, "--method", "caface"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'synth_features_style.npy'}: no such file; caface trains on" in err
    assert main([*argv, "--method", "coreset", "--epochs", "0"]) == 2
    assert "epochs must be at least 1, got 0" in capsys.readouterr().err
    (tmp_path / "meta" / "synth_1N_probe_mixed.csv").unlink()
    assert main([*argv, "--method", "coreset"]) == 2
    assert "meta file not found" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()


def test_train_split_shares_the_backbone_constants_not_the_identities():
    evaluation, training = generate(SMALL, seed=4), generate(SMALL, seed=4, split="train")

    def gallery_directions(bench):
        gallery = np.concatenate(list(bench.meta.galleries.values()))[:, 0]
        sums = [bench.features[bench.meta.templates == t].sum(0) for t in np.sort(gallery)]
        return np.stack([s / np.linalg.norm(s) for s in sums])

    # Same identities would put each training gallery near an evaluation gallery.
    cross = gallery_directions(training) @ gallery_directions(evaluation).T
    assert np.abs(cross).max() < 0.3, np.abs(cross).max()
    # The style statistics of the sharpest, best-lit frames agree channel by channel.
    sharpest = [
        b.style[(b.kind == FACE) & (b.quality > 0.9)].mean(0) for b in (evaluation, training)
    ]
    np.testing.assert_allclose(sharpest[1], sharpest[0], rtol=0.1)
    assert not np.array_equal(training.features[:5], evaluation.features[:5])
    with pytest.raises(ValueError, match="split must be one of eval, train, got 'test'"):
        generate(SMALL, seed=4, split="test")
