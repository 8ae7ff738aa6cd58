"""fusedset.nn.CAFace against the released outputs (../shared/fixtures) and the eager reference."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from fusedset.nn import CAFace, CheckpointKeyError
from fusedset.reference import CAFaceConfig, CAFaceReference, style_pool

from .helpers import assert_close_elementwise, assert_rel_close

RTOL = 1e-4  # the drop-in bar of issue 5, fp32
ONE_SHOT = ["aggregated", "cluster_feature", "cluster_style", "confidence_weight", "assignment"]


def random_model(confidence_dim: int = 512, depth: int = 2, seed: int = 0) -> CAFace:
    """Random weights and BatchNorm statistics away from their defaults, so that a wrong
    parameter, buffer or axis cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    model = CAFace(CAFaceConfig(depth=depth, confidence_dim=confidence_dim))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("pe"):
                noise = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(tensor.abs() + 0.5 if "running_var" in name else tensor + noise)
    return model.eval()


def random_set(batch: int, n: int, channels: int = 512, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(batch, n, channels, generator=generator), dim=-1)
    norms = torch.rand(batch, n, 1, generator=generator) * 30 + 5
    stats = torch.randn(batch, n, 384, 2, generator=generator)
    return directions * norms, stats


def reference_twin(model: CAFace) -> CAFaceReference:
    twin = CAFaceReference(model.config).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def test_matches_the_released_outputs_one_shot(caface_cases):
    for case in caface_cases:
        model = CAFace.from_official(case["state_dict"])
        with torch.no_grad():
            out = model.details(case["features"], case["style_stats"])
            fused = model(case["features"], case["style_stats"])
        for name in ONE_SHOT:
            assert_rel_close(getattr(out, name), case[name], RTOL)
        assert_rel_close(fused, case["aggregated"], RTOL)


def test_stream_matches_the_released_memory_mode_after_every_chunk(caface_cases):
    for case in caface_cases:
        model = CAFace.from_official(case["state_dict"])
        stream = model.stream(case["features"].shape[0])
        start = 0
        with torch.no_grad():
            for size, expected in zip(case["chunk_sizes"], case["chunk_aggregated"], strict=True):
                stop = start + size
                stream.update(case["features"][:, start:stop], case["style_stats"][:, start:stop])
                start = stop
                assert_rel_close(stream.result(), expected, RTOL)
        assert_rel_close(stream.cluster_feature(), case["chunk_final_cluster_feature"], RTOL)


@pytest.mark.parametrize("confidence_dim", [512, 1])
def test_matches_the_reference_module(confidence_dim):
    model = random_model(confidence_dim)
    reference = reference_twin(model)
    features, stats = random_set(3, 77)
    with torch.no_grad():
        expected = reference(features, stats)
        out = model.details(features, stats)
    for name in ONE_SHOT:
        assert_rel_close(getattr(out, name), getattr(expected, name), RTOL)
    # Assignment weights span eight orders of magnitude, positive: each one to RTOL of itself.
    assert_close_elementwise(out.assignment, expected.assignment, RTOL)


@pytest.mark.parametrize("normalization", ["official", "paper"])
def test_batched_chunks_equal_sequential_chunks(normalization):
    model = random_model()
    features, stats = random_set(2, 1000)
    sizes = [256, 256, 256, 232]
    with torch.no_grad():
        sequential = model.stream(2, normalization)
        for f, s in zip(features.split(sizes, 1), stats.split(sizes, 1), strict=True):
            sequential.update(f, s)
        batched = model.stream(2, normalization, chunk_size=256).update(features, stats)
        reference = reference_twin(model).forward_chunks(features, stats, sizes, normalization)
    assert batched.state.chunks == sequential.state.chunks == 4
    assert_rel_close(batched.result(), sequential.result(), 1e-6)
    assert_rel_close(batched.result(), reference.chunk_aggregated[-1], RTOL)


def test_chunk_order_and_merging_do_not_change_the_result():
    model = random_model()
    features, stats = random_set(2, 600)
    chunks = list(zip(features.split(150, 1), stats.split(150, 1), strict=True))
    with torch.no_grad():
        forward = model.stream(2)
        for f, s in chunks:
            forward.update(f, s)
        backward = model.stream(2)
        for f, s in reversed(chunks):
            backward.update(f, s)
        left, right = model.stream(2), model.stream(2)
        for i, (f, s) in enumerate(chunks):
            (left if i % 2 else right).update(f, s)
        merged = left.merge(right)
    assert_rel_close(backward.result(), forward.result(), 1e-6)
    assert_rel_close(merged.result(), forward.result(), 1e-6)


def test_a_failed_update_leaves_the_stream_unchanged():
    model = random_model()
    features, stats = random_set(2, 40)
    stream = model.stream(2, chunk_size=10).update(features[:, :20], stats[:, :20])
    before = stream.result()
    bad = features[:, 20:].clone()
    bad[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="features holds NaN or Inf"):
        stream.update(bad, stats[:, 20:])
    with pytest.raises(ValueError, match="must hold 2 probes"):
        stream.update(features[:1], stats[:1])
    assert stream.state.chunks == 2
    torch.testing.assert_close(stream.result(), before, rtol=0, atol=0)


def test_threads_sharing_a_stream_lose_no_update():
    """Two threads update one stream, three chunks each; the clustering passes are made to
    overlap (a barrier inside), the moment a copy-add-store update loses the other's chunk."""
    model = random_model()
    features, stats = random_set(2, 6 * 15)
    chunks = list(zip(features.split(15, 1), stats.split(15, 1), strict=True))
    with torch.no_grad():
        sequential = model.stream(2)
        for f, s in chunks:
            sequential.update(f, s)
    shared = model.stream(2)
    overlap = threading.Barrier(2, timeout=60)
    cluster_sums = model.cluster_sums

    def overlapping(*args):
        overlap.wait()
        return cluster_sums(*args)

    errors = []

    def feed(part):
        try:
            with torch.no_grad():
                for f, s in part:
                    shared.update(f, s)
        except Exception as exc:  # reported below: an exception in a thread is not a failure
            errors.append(exc)

    model.cluster_sums = overlapping
    threads = [threading.Thread(target=feed, args=(chunks[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    del model.cluster_sums
    assert not errors, errors
    assert shared.state.chunks == 6
    assert_rel_close(shared.result(), sequential.result(), 1e-6)
    assert_rel_close(shared.cluster_feature(), sequential.cluster_feature(), 1e-6)


def test_empty_stream_result_is_a_clear_error():
    with pytest.raises(RuntimeError, match="has seen no image"):
        random_model().stream(2).result()


def test_state_dict_round_trips_and_official_layouts_load(tmp_path):
    model = random_model()
    state = model.state_dict()
    lightning = {f"aggregator.{k}": v for k, v in state.items()}
    lightning["model.body.0.weight"] = torch.zeros(3)
    lightning["center.weight"] = torch.zeros(2, 512)
    path = tmp_path / "caface.ckpt"
    torch.save({"state_dict": lightning, "epoch": 3}, path)
    features, stats = random_set(2, 9)
    for source in (state, lightning, path):
        loaded = CAFace.from_official(source)
        assert list(loaded.state_dict()) == list(state)
        with torch.no_grad():
            torch.testing.assert_close(loaded(features, stats), model(features, stats))
    broken = dict(state)
    del broken["norm_emb.scale"]
    broken["fusion_net.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"missing keys \(1\): norm_emb.scale") as err:
        CAFace.from_official(broken)
    assert err.value.unexpected == ["fusion_net.extra"]


@pytest.mark.parametrize(
    ("features", "stats", "pattern"),
    [
        (
            torch.randn(2, 5, 512),
            torch.randn(2, 4, 384, 2),
            r"style_stats must have shape \(2, 5, 384, 2\), got shape \(2, 4, 384, 2\)",
        ),
        (
            torch.randn(2, 5, 256),
            torch.randn(2, 5, 384, 2),
            r"features must have 512 channels .* got 256",
        ),
        (torch.randn(2, 0, 512), torch.randn(2, 0, 384, 2), r"empty set \(N = 0\)"),
        (
            torch.randn(5, 512),
            torch.randn(5, 384, 2),
            r"features must be a \(B, N, C\) tensor, got shape \(5, 512\)",
        ),
        (
            torch.randn(2, 5, 512),
            torch.randn(2, 5, 384),
            r"style_stats must have shape .* got shape \(2, 5, 384\)",
        ),
    ],
)
def test_bad_inputs_name_the_argument(features, stats, pattern):
    with pytest.raises(ValueError, match=pattern):
        random_model()(features, stats)


def test_nan_features_are_refused():
    features, stats = random_set(1, 4)
    features[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="features holds NaN or Inf"):
        random_model()(features, stats)


def test_style_stats_from_maps_is_style_pool_concatenated():
    block3, block5 = torch.randn(6, 128, 28, 28), torch.randn(6, 256, 14, 14)
    stats = CAFace.style_stats_from_maps([block3, block5])
    expected = torch.cat([style_pool(block3), style_pool(block5)], dim=1)
    assert stats.shape == (6, 384, 2)
    assert_rel_close(stats, expected, 1e-5)


def test_fusion_weights_rebuild_the_fused_feature():
    model = random_model(confidence_dim=1)
    features, stats = random_set(2, 30)
    with torch.no_grad():
        weights = model.fusion_weights(features, stats)
        rebuilt = torch.einsum(
            "bn,bnc->bc", weights, features / (features.norm(dim=-1, keepdim=True) + 1e-5)
        )
        assert_rel_close(rebuilt, model(features, stats), 1e-5)
    assert weights.shape == (2, 30)
    assert (weights >= 0).all()


def _training_step_gradients(model: CAFace, features, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """One vector of all parameter gradients of a cosine-loss step, fusedset's and the reference
    twin's. One vector: several gradients are zero in exact arithmetic (a bias under a softmax
    over the centers, a bias before BatchNorm), and rounding noise against rounding noise has no
    meaningful per-parameter relative error."""
    reference = reference_twin(model)
    target = F.normalize(torch.randn(features.shape[0], 512, dtype=features.dtype), dim=-1)
    (1 - F.cosine_similarity(model(features, stats), target)).mean().backward()
    (1 - F.cosine_similarity(reference(features, stats).aggregated, target)).mean().backward()
    twins = dict(reference.named_parameters())
    names = [n for n, p in model.named_parameters() if twins[n].grad is not None]
    assert all(model.get_parameter(n).grad is not None for n in names)
    return (
        torch.cat([model.get_parameter(n).grad.flatten() for n in names]),
        torch.cat([twins[n].grad.flatten() for n in names]),
    )


def test_training_step_gradients_match_the_reference():
    """fp32 at the 1e-4 bar, for a model as training starts it (the released initialization),
    on fresh inputs: over 30 seeds the largest error was 3.5e-5. random_model()'s weights are
    worse conditioned: there fp32 rounding alone moves the reference's own gradients by up to
    6e-4 from their float64 values, so the float64 test below checks those weights instead."""
    model = CAFace(CAFaceConfig(depth=2, confidence_dim=512)).train()
    features, stats = random_set(4, 50, seed=int(torch.randint(1 << 30, ())))
    assert_rel_close(*_training_step_gradients(model, features, stats), RTOL)


def test_training_step_gradients_match_the_reference_float64():
    """Random weights and BatchNorm statistics in float64: the same gradients up to rounding, so
    any wrong parameter, axis or formula in the fused path shows."""
    model = random_model().train().double()
    features, stats = random_set(4, 50)
    assert_rel_close(*_training_step_gradients(model, features.double(), stats.double()), 1e-10)


@pytest.mark.slow
def test_training_halves_the_loss_on_noisy_sets():
    """Sets of an identity's noisy copies mixed with a burst of one distractor (a non-face the
    video keeps showing): plain averaging leans to the distractor. Good frames have large norms
    and sharper style statistics, as sharp frames do; fusion that learns to trust them at least
    halves the cosine loss to the identity."""
    torch.manual_seed(0)
    model = CAFace(CAFaceConfig(depth=1, confidence_dim=512)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(size=8, n=16):
        identity = F.normalize(torch.randn(size, 1, 512), dim=-1)
        distractor = F.normalize(torch.randn(size, 1, 512), dim=-1)
        good = torch.rand(size, n, 1) < 0.35
        noise = 0.2 * F.normalize(torch.randn(size, n, 512), dim=-1)
        directions = F.normalize(torch.where(good, identity, distractor) + noise, dim=-1)
        norms = torch.where(good, 30.0, 8.0) + 2 * torch.rand(size, n, 1)
        stats = torch.randn(size, n, 384, 2) * 0.1 + torch.where(good, 1.0, -1.0)[..., None]
        return directions * norms, stats, identity[:, 0]

    losses = []
    for _ in range(60):
        features, stats, target = batch()
        loss = (1 - F.cosine_similarity(model(features, stats), target)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 2, (first, last)


def test_bfloat16_autocast_runs_with_float32_sums():
    """bf16 matmuls shift a sharp assignment a little; the fused feature keeps its direction."""
    model = random_model()
    features, stats = random_set(2, 64)
    with torch.no_grad():
        expected = model(features, stats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model(features, stats)
    assert torch.isfinite(fused).all()
    assert (F.cosine_similarity(fused.float(), expected) > 0.97).all()
