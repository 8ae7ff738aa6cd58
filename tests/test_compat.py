"""fusedset.compat driven the way the authors' code calls the released modules: CAFace's IJB
validation (compress_intermediate per image batch, memory_count = 0 per template, one call per
split) and training loop, FaceCoresetNet's training step (the 3-tuple, only_FPS), against the
released outputs (../shared/fixtures) and the eager reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedset.compat import StyleBasedAggregator, TemplateAggregateModel
from fusedset.nn import CAFace, CheckpointKeyError, FaceCoresetNet
from fusedset.reference import CAFaceReference, FaceCoresetNetReference
from fusedset.reference.caface import memory_means, merge_chunk

from .helpers import assert_rel_close, torch_threads
from .test_nn_caface import random_model, random_set
from .test_nn_facecoresetnet import _features, _randomized, _split

RTOL = 1e-4  # the drop-in bar of fusedset.nn, fp32
DICT_KEYS = {
    "aggregated",
    "cluster_feature",
    "mu",
    "cluster_style",
    "group_token",
    "confidence_weight",
    "conf",
    "weights",
    "attn_dict_list",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: a second OpenMP thread only adds synchronization on shared cores."""
    with torch_threads(1):
        yield


def _compact(aggregator: StyleBasedAggregator, style_stats: torch.Tensor) -> torch.Tensor:
    """The released validation's image pass: the stats of blocks 3 and 5 of a flat batch of
    images through compress_intermediate, then folded back to (B, N, style_dim)."""
    b, n = style_stats.shape[:2]
    flat = style_stats.reshape(b * n, *style_stats.shape[2:])
    return aggregator.compress_intermediate([flat[:, :128], flat[:, 128:]]).view(b, n, -1)


def _random_aggregator(use_memory: bool = True, **kwargs) -> StyleBasedAggregator:
    source = random_model(**kwargs)
    aggregator = StyleBasedAggregator(source.config, use_memory=use_memory)
    aggregator.load_state_dict(source.state_dict())
    return aggregator.eval()


# -- StyleBasedAggregator against the released outputs ------------------------------------------


@torch.no_grad()
def test_one_call_returns_the_released_dict(caface_cases, poisoned_outputs):
    for case in caface_cases:
        aggregator = StyleBasedAggregator.from_official(case["state_dict"])
        compact = _compact(aggregator, case["style_stats"])
        assert_rel_close(compact, case["style_embedding"], RTOL)
        aggregator.memory_count = 0
        result = aggregator(case["features"], compact)
        assert set(result) == DICT_KEYS
        for name in ("aggregated", "cluster_feature", "cluster_style", "confidence_weight"):
            assert_rel_close(result[name], case[name], RTOL)
        attn = result["attn_dict_list"][0]["attn"]
        assert attn.shape == (case["features"].shape[0], 1, *case["assignment"].shape[1:])
        assert_rel_close(attn[:, 0], case["assignment"], RTOL)
        assert result["mu"] is result["cluster_feature"]
        assert torch.equal(result["group_token"][0], aggregator.centers[0])
        norms = result["cluster_feature"].norm(dim=-1, keepdim=True)
        assert_rel_close(result["conf"], result["confidence_weight"] * norms, 1e-6)
        assert_rel_close(result["weights"].sum(dim=1), torch.ones_like(result["aggregated"]), 1e-6)


@torch.no_grad()
def test_validation_loop_matches_the_released_memory_mode_after_every_chunk(
    caface_cases, poisoned_outputs
):
    """Per template: memory_count = 0, then one call per split; a second template in between
    must not leak into the next one. The first pass reads every split's result only after the
    last split (their aggregation deferred until then), the second as it goes."""
    for case in caface_cases:
        aggregator = StyleBasedAggregator.from_official(case["state_dict"])
        features, compact = case["features"], _compact(aggregator, case["style_stats"])
        for read_late in (True, False):
            aggregator.memory_count = 0
            start, results = 0, []
            for calls, (size, expected) in enumerate(
                zip(case["chunk_sizes"], case["chunk_aggregated"], strict=True), start=1
            ):
                stop = start + size
                results.append(aggregator(features[:, start:stop], compact[:, start:stop]))
                start = stop
                assert aggregator.memory_count == calls
                if not read_late:
                    assert_rel_close(results[-1]["aggregated"], expected, RTOL)
            for result, expected in zip(results, case["chunk_aggregated"], strict=True):
                assert_rel_close(result["aggregated"], expected, RTOL)
            assert_rel_close(result["cluster_feature"], case["chunk_final_cluster_feature"], RTOL)
            aggregator.memory_count = 0
            aggregator(features[:1, :3] * 2, compact[:1, :3])  # another template


def test_result_dict_reads_writes_and_resolves_as_a_dict():
    aggregator = _random_aggregator()
    call = _bad_call()
    with torch.no_grad():
        deferred = aggregator(**call)
        assert set(deferred) == DICT_KEYS
        assert len(deferred) == len(DICT_KEYS)
        assert set(deferred["attn_dict_list"][0]) == {"attn", "hard", "soft"}
        deferred["weights"] = "replaced"
        assert deferred["weights"] == "replaced"
        del deferred["mu"]
        assert "mu" not in deferred
    eager = aggregator(**call)
    assert eager.keys() == DICT_KEYS
    assert_rel_close(deferred["aggregated"], eager["aggregated"].detach(), 1e-6)
    assert "aggregated" in repr(eager)


@torch.no_grad()
def test_checkpoints_load_both_ways(caface_cases, tmp_path):
    case = caface_cases[0]
    released = case["state_dict"]
    prefixed = {f"aggregator.{key}": value for key, value in released.items()}
    checkpoint = {"state_dict": {**prefixed, "model.body.0.weight": torch.zeros(3)}}
    torch.save(checkpoint, tmp_path / "caface.ckpt")
    compact = None
    for source in [released, checkpoint, tmp_path / "caface.ckpt"]:
        aggregator = StyleBasedAggregator.from_official(source)
        assert aggregator.use_memory
        assert not aggregator.training
        assert list(aggregator.state_dict()) == list(released)
        compact = _compact(aggregator, case["style_stats"])
        result = aggregator(case["features"], compact)
        assert_rel_close(result["aggregated"], case["aggregated"], RTOL)
    saved = aggregator.state_dict()
    for other in (CAFaceReference(aggregator.config), CAFace(aggregator.config)):
        other.load_state_dict(saved)
    back = StyleBasedAggregator(aggregator.config)
    back.load_state_dict(CAFace.from_official(released).state_dict())
    assert not back.use_memory
    assert torch.equal(back.eval()(case["features"], compact)["aggregated"], result["aggregated"])
    with pytest.raises(CheckpointKeyError, match="missing keys"):
        StyleBasedAggregator.from_official({k: v for k, v in released.items() if "bn" not in k})


# -- StyleBasedAggregator against the reference -------------------------------------------------


@pytest.mark.parametrize("chunk_sizes", [[1, 1, 1], [7, 1, 4]])
@torch.no_grad()
def test_memory_mode_matches_the_reference_chunks(chunk_sizes, poisoned_outputs):
    aggregator = _random_aggregator()
    reference = CAFaceReference(aggregator.config).eval()
    reference.load_state_dict(aggregator.state_dict())
    features, stats = random_set(2, sum(chunk_sizes))
    expected = reference.forward_chunks(features, stats, chunk_sizes)
    compact = _compact(aggregator, stats)
    aggregator.memory_count = 0
    start = 0
    for size, want in zip(chunk_sizes, expected.chunk_aggregated, strict=True):
        got = aggregator(features[:, start : start + size], compact[:, start : start + size])
        start += size
        assert_rel_close(got["aggregated"], want, RTOL)
    assert_rel_close(got["cluster_style"], expected.cluster_style, RTOL)


@torch.no_grad()
def test_without_memory_every_call_stands_alone():
    features, stats = random_set(2, 9)
    for use_memory, count in [(False, 0), (True, -1)]:
        aggregator = _random_aggregator(use_memory=use_memory, confidence_dim=1)
        compact = _compact(aggregator, stats)
        alone = aggregator(features[:, 4:], compact[:, 4:], return_attn=False)
        aggregator.memory_count = count
        aggregator(features[:, :4], compact[:, :4])
        second = aggregator(features[:, 4:], compact[:, 4:], return_attn=False)
        assert aggregator.memory_count == count
        assert aggregator.memory is None
        assert second["attn_dict_list"] == [{}]
        assert torch.equal(second["aggregated"], alone["aggregated"])
    aggregator.memory_count = 0
    aggregator(features[:, :4], compact[:, :4])
    aggregator.reset_memory()
    assert (aggregator.memory_count, aggregator.memory) == (-1, None)


def test_training_loop_gradients_match_the_reference():
    """The released training's memory step: memory_count = 0, two halves through the memory,
    a loss on the second; the memory keeps the first half's graph."""
    aggregator = _random_aggregator().train().double()
    reference = CAFaceReference(aggregator.config).double().train()
    reference.load_state_dict(aggregator.state_dict())
    features, stats = (t.double() for t in random_set(3, 10))
    target = F.normalize(torch.randn(3, 512, dtype=torch.float64), dim=-1)

    compact = _compact(aggregator, stats)
    aggregator.memory_count = 0
    aggregator(features[:, :6], compact[:, :6])
    assert aggregator.memory["cluster_features"].requires_grad
    fused = aggregator(features[:, 6:], compact[:, 6:])["aggregated"]
    (1 - F.cosine_similarity(fused, target)).sum().backward()

    style = reference.style_embedding(stats)
    state = None
    for part in (slice(0, 6), slice(6, 10)):
        state = merge_chunk(state, reference.cluster_chunk(features[:, part], style[:, part])[1])
    expected = reference.aggregate(*memory_means(state))[0]
    (1 - F.cosine_similarity(expected, target)).sum().backward()

    assert_rel_close(fused.detach(), expected.detach(), 1e-10)
    twins = dict(reference.named_parameters())
    names = [n for n, p in aggregator.named_parameters() if twins[n].grad is not None]
    assert "style_maker.cfc" in names
    got = torch.cat([aggregator.get_parameter(n).grad.flatten() for n in names])
    assert_rel_close(got, torch.cat([twins[n].grad.flatten() for n in names]), 1e-9)


def test_eval_memory_is_detached():
    aggregator = _random_aggregator()
    features, stats = random_set(1, 5)
    aggregator.memory_count = 0
    aggregator(features, _compact(aggregator, stats))
    assert set(aggregator.memory) == {"attn", "cluster_features", "cluster_style"}
    assert not any(value.requires_grad for value in aggregator.memory.values())


def _bad_call(**override):
    args = {"folded_features": random_set(2, 5)[0], "intermediate": torch.randn(2, 5, 64)}
    return {**args, **override}


@pytest.mark.parametrize(
    ("override", "error", "pattern"),
    [
        ({"folded_features": torch.randn(5, 512)}, ValueError, r"folded_features must be a \(B"),
        ({"folded_features": torch.ones(2, 5, 512, dtype=torch.int64)}, TypeError, "floating"),
        ({"folded_features": torch.randn(2, 0, 512)}, ValueError, "empty set"),
        ({"folded_features": torch.randn(2, 5, 256)}, ValueError, "512 channels .* got 256"),
        ({"intermediate": torch.randn(2, 5, 32)}, ValueError, r"intermediate must be .*\(2, 5, 64"),
        ({"intermediate": torch.randn(2, 5, 384, 2)}, ValueError, "compress_intermediate first"),
        ({"return_attn": 1}, TypeError, "return_attn must be a bool"),
        ({"intermediate": torch.full((2, 5, 64), float("nan"))}, ValueError, "intermediate holds"),
    ],
)
def test_bad_calls_name_the_argument(override, error, pattern):
    with pytest.raises(error, match=pattern):
        _random_aggregator()(**_bad_call(**override))


def test_a_memory_of_other_probes_is_refused():
    aggregator = _random_aggregator()
    aggregator.memory_count = 0
    aggregator(**_bad_call())
    with pytest.raises(ValueError, match=r"holds 1 probes, but the memory .* holds 2"):
        aggregator(torch.randn(1, 5, 512) * 9, torch.randn(1, 5, 64))


@pytest.mark.parametrize(
    ("intermediate", "error", "pattern"),
    [
        (torch.randn(4, 384, 2), TypeError, "must be a list of style statistics"),
        ([], ValueError, "intermediate is empty"),
        ([torch.randn(4, 128, 28, 28)], ValueError, r"intermediate\[0\] .*style_pool"),
        ([torch.randn(4, 128, 2)], ValueError, "384 style channels in all, got 128"),
        ([torch.randn(4, 128, 2), torch.randn(3, 256, 2)], ValueError, "same images"),
        ([torch.ones(4, 384, 2, dtype=torch.int32)], TypeError, "floating point"),
    ],
)
def test_bad_intermediates_name_the_argument(intermediate, error, pattern):
    with pytest.raises(error, match=pattern):
        _random_aggregator().compress_intermediate(intermediate)


# -- TemplateAggregateModel ---------------------------------------------------------------------


@torch.no_grad()
def test_three_tuple_and_only_fps_match_the_released_outputs(
    facecoresetnet_fixture, poisoned_outputs
):
    for case in facecoresetnet_fixture["cases"]:
        model = TemplateAggregateModel.from_official(
            {**facecoresetnet_fixture["state_dict"], "gamma": torch.tensor(case["gamma"])},
            coreset_size=case["coreset_size"],
        )
        descriptor, norm, fps_sample = model(case["embeddings"], case["norms"])
        assert_rel_close(descriptor, case["aggregated"], RTOL)
        assert_rel_close(norm, case["aggregated_norm"], RTOL)
        assert_rel_close(fps_sample, case["core_template"], RTOL)
        descriptor, norm, fps_sample = model(case["embeddings"], case["norms"], only_FPS=True)
        assert_rel_close(descriptor * norm, case["fps_only_mean"], RTOL)
        assert_rel_close(descriptor.norm(dim=-1), torch.ones(len(descriptor)), 1e-6)
        assert_rel_close(fps_sample, case["core_template"], RTOL)


@torch.no_grad()
def test_coreset_checkpoints_load_both_ways(facecoresetnet_fixture, tmp_path):
    released = facecoresetnet_fixture["state_dict"]
    checkpoint = {"state_dict": {f"aggregate_model.{k}": v for k, v in released.items()}}
    torch.save(checkpoint, tmp_path / "coreset.ckpt")
    for source in [released, checkpoint, tmp_path / "coreset.ckpt"]:
        model = TemplateAggregateModel.from_official(source, coreset_size=4)
        assert type(model) is TemplateAggregateModel
        assert (model.coreset_size, model.training) == (4, False)
        assert list(model.state_dict()) == list(released)
    assert isinstance(model.gamma, nn.Parameter)
    FaceCoresetNetReference().load_state_dict(model.state_dict())
    built = TemplateAggregateModel(512, 5)
    built.load_state_dict(FaceCoresetNet.from_official(released).state_dict())
    assert built.coreset_size == 5


def _coreset_pair(k: int = 3):
    torch.manual_seed(0)
    reference = _randomized(FaceCoresetNetReference(64, 4, k, dropout=0.0))
    reference.gamma.data.fill_(0.7)
    model = TemplateAggregateModel(64, k, num_heads=4, dropout=0.0)
    model.load_state_dict(reference.state_dict())
    return reference, model


@pytest.mark.parametrize(("batch", "n"), [(3, 1), (2, 17)])
@torch.no_grad()
def test_eval_matches_the_reference(batch, n, poisoned_outputs):
    reference, model = _coreset_pair()
    embeddings, norms = _split(_features(batch, n, 64))
    expected = reference.eval()(embeddings, norms)
    descriptor, norm, fps_sample = model.eval()(embeddings, norms)
    assert fps_sample.shape == (batch, min(3, n), 64)
    assert_rel_close(descriptor, expected.aggregated, 1e-5)
    assert_rel_close(norm, expected.aggregated_norm, 1e-5)
    assert_rel_close(fps_sample, expected.core_template, 1e-6)
    descriptor, norm, _ = model(embeddings, norms, True)
    assert_rel_close(descriptor * norm, expected.fps_only_mean, 1e-6)


@pytest.mark.parametrize("only_fps", [False, True])
def test_training_step_matches_the_reference(only_fps):
    """Gumbel selection with the same noise: the 3-tuple and the gradients into gamma and the
    inputs, with and without the decoder."""
    reference, model = _coreset_pair()
    reference.train()
    model.train()
    features = _features(3, 12, 64)
    noise = -torch.empty(3, 3, 12).exponential_(generator=torch.Generator().manual_seed(7)).log()
    weight = torch.randn(3, 64)

    def step(run):
        x = features.clone().requires_grad_()
        descriptor, norm, core = run(*_split(x))
        ((descriptor * weight).sum() + norm.sum() / 10 + core.sum() / 100).backward()
        return x.grad, descriptor.detach(), core.detach()

    def run_reference(embeddings, norms):
        out = reference(embeddings, norms, noise)
        if not only_fps:
            return out.aggregated, out.aggregated_norm, out.core_template
        norm = out.fps_only_mean.norm(dim=-1, keepdim=True)
        return out.fps_only_mean / norm, norm, out.core_template

    got = step(lambda e, n: model(e, n, only_fps, noise=noise))
    expected = step(run_reference)
    for actual, want in zip(got, expected, strict=True):
        assert_rel_close(actual, want, RTOL)
    assert model.gamma.grad.abs() > 0
    assert_rel_close(model.gamma.grad, reference.gamma.grad, RTOL)


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        ((torch.randn(4, 64), torch.ones(4, 1)), ValueError, r"template_features must have shape"),
        ((torch.randn(2, 0, 64), torch.ones(2, 0, 1)), ValueError, "template_features is an empty"),
        ((torch.randn(2, 4, 64), torch.ones(2, 4)), ValueError, r"template_norms must .*\(2, 4, 1"),
        ((torch.randn(2, 4, 64), torch.ones(2, 4, 1, dtype=torch.int64)), TypeError, "floating"),
        ((torch.randn(2, 4, 64), torch.ones(2, 4, 1), "yes"), TypeError, "only_FPS must be a bool"),
    ],
)
def test_bad_templates_name_the_argument(args, error, pattern):
    with pytest.raises(error, match=pattern):
        _coreset_pair()[1](*args)
