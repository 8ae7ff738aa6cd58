"""The eager reference modules against the outputs of the authors' released code
(../shared/fixtures, see its README), and the checkpoint loaders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedset.nn import (
    CheckpointKeyError,
    load_caface_reference,
    load_facecoresetnet_reference,
)
from fusedset.reference import CAFaceConfig, CAFaceReference, FaceCoresetNetReference
from fusedset.reference.caface import cluster_means, memory_means, merge_chunk
from fusedset.reference.facecoresetnet import select_core_template

from .helpers import assert_rel_close

RTOL = 1e-4  # the drop-in bar of issue 5, fp32

CAFACE_ONE_SHOT = [
    "aggregated",
    "cluster_feature",
    "cluster_style",
    "confidence_weight",
    "assignment",
    "style_embedding",
]
FACECORESETNET_OUTPUTS = ["aggregated", "aggregated_norm", "core_template", "fps_only_mean"]


def facecoresetnet_state_dict(fixture: dict, case: dict) -> dict:
    """The fixture's state dict with the case's gamma, as the fixtures README prescribes."""
    return {**fixture["state_dict"], "gamma": torch.tensor(case["gamma"])}


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@torch.no_grad()
def test_caface_one_shot_matches_released(caface_cases):
    for index, case in enumerate(caface_cases):
        model = CAFaceReference.from_state_dict(case["state_dict"])
        out = model(case["features"], case["style_stats"])
        for name in CAFACE_ONE_SHOT:
            try:
                assert_rel_close(getattr(out, name), case[name], RTOL)
            except AssertionError as error:
                raise AssertionError(f"case {index}, {name}: {error}") from None


@torch.no_grad()
def test_caface_memory_mode_matches_released(caface_cases):
    for index, case in enumerate(caface_cases):
        model = CAFaceReference.from_state_dict(case["state_dict"])
        out = model.forward_chunks(case["features"], case["style_stats"], case["chunk_sizes"])
        assert len(out.chunk_aggregated) == len(case["chunk_aggregated"])
        pairs = [*zip(out.chunk_aggregated, case["chunk_aggregated"], strict=True)]
        pairs.append((out.cluster_feature, case["chunk_final_cluster_feature"]))
        for step, (actual, expected) in enumerate(pairs):
            try:
                assert_rel_close(actual, expected, RTOL)
            except AssertionError as error:
                raise AssertionError(f"case {index}, after chunk {step}: {error}") from None


def test_caface_config_and_state_dict_round_trip(caface_cases):
    for case in caface_cases:
        model = CAFaceReference.from_state_dict(case["state_dict"])
        config = case["config"]
        assert model.config.depth == config["depths"][0]
        assert model.config.num_centers == config["num_group_tokens"][0]
        assert model.config.confidence_dim == config["confidence_dim"]
        assert model.config.norm_dim == config["norm_dim"]
        assert_same_state_dict(model.state_dict(), case["state_dict"])


def test_caface_config_inferred_from_any_layout():
    config = CAFaceConfig(depth=3, num_centers=8, confidence_dim=1)
    state_dict = CAFaceReference(config).state_dict()
    assert CAFaceConfig.from_state_dict(state_dict) == config
    with pytest.raises(ValueError, match=r"no key 'fusion_net\.clustering_layer\.group_token'"):
        CAFaceConfig.from_state_dict(
            {k: v for k, v in state_dict.items() if not k.endswith("group_token")}
        )


@torch.no_grad()
def test_caface_memory_merge_is_a_sum_over_chunks():
    torch.manual_seed(0)
    model = CAFaceReference().eval()
    features = torch.randn(2, 12, 512) * 20
    style = torch.randn(2, 12, 64)
    chunks = [
        model.cluster_chunk(f, s)[1]
        for f, s in zip(features.split(4, 1), style.split(4, 1), strict=True)
    ]
    for normalization in ["official", "paper"]:
        forward, backward = None, None
        for chunk in chunks:
            forward = merge_chunk(forward, chunk, normalization)
        for chunk in reversed(chunks):
            backward = merge_chunk(backward, chunk, normalization)
        for a, b in zip(memory_means(forward), memory_means(backward), strict=True):
            assert_rel_close(a, b, 1e-6)
    # One chunk: the memory mean is the one-call mean.
    single = model.cluster_chunk(features, style)[1]
    for a, b in zip(memory_means(merge_chunk(None, single)), cluster_means(single), strict=True):
        assert_rel_close(a, b, 1e-6)
    # Paper normalization: sum_t A_t V_t / sum_t r_t.
    paper = memory_means(merge_chunk(merge_chunk(None, chunks[0], "paper"), chunks[1], "paper"))
    expected = (chunks[0].feature + chunks[1].feature) / (chunks[0].count + chunks[1].count)[
        ..., None
    ]
    assert_rel_close(paper[0], expected, 1e-6)
    with pytest.raises(ValueError, match="normalization"):
        merge_chunk(None, single, "other")


@torch.no_grad()
def test_facecoresetnet_matches_released(facecoresetnet_fixture):
    for index, case in enumerate(facecoresetnet_fixture["cases"]):
        model = FaceCoresetNetReference.from_state_dict(
            facecoresetnet_state_dict(facecoresetnet_fixture, case), case["coreset_size"]
        )
        out = model(case["embeddings"], case["norms"])
        assert torch.equal(out.selected_indices, case["selected_indices"]), index
        for name in FACECORESETNET_OUTPUTS:
            try:
                assert_rel_close(getattr(out, name), case[name], RTOL)
            except AssertionError as error:
                raise AssertionError(f"case {index}, {name}: {error}") from None


def test_facecoresetnet_state_dict_round_trips(facecoresetnet_fixture):
    state_dict = facecoresetnet_fixture["state_dict"]
    model = FaceCoresetNetReference.from_state_dict(state_dict)
    assert_same_state_dict(model.state_dict(), state_dict)


def _released_training_selection(x, norms, k, gamma):
    """The released training-mode loop, restated with torch's own gumbel_softmax."""
    units = F.normalize(x, dim=-1)

    def distance_to(row):
        return norms.pow(gamma) * (1 - (units @ F.normalize(row, dim=-1)[..., None])[..., 0]) / 2

    one_hot = F.gumbel_softmax(norms, tau=1.0, hard=True, dim=-1)
    rows = [torch.einsum("bn,bnc->bc", one_hot, x)]
    distance = distance_to(rows[0])
    for _ in range(k - 1):
        one_hot = F.gumbel_softmax(distance, tau=1.0, hard=True, dim=-1)
        rows.append(torch.einsum("bn,bnc->bc", one_hot, x))
        distance = torch.minimum(distance, distance_to(rows[-1]))
    return torch.stack(rows, dim=1)


def test_facecoresetnet_training_selection_is_gumbel_straight_through():
    torch.manual_seed(0)
    x = (
        F.normalize(torch.randn(2, 9, 16), dim=-1) * torch.rand(2, 9, 1) * 3 + 0.1
    ).requires_grad_()
    gamma = torch.tensor(0.7, requires_grad=True)
    weight = torch.randn(2, 4, 16)

    def run(select):
        torch.manual_seed(1)
        core = select()
        grads = torch.autograd.grad((core * weight).sum(), [x, gamma])
        return core, grads

    def ours():
        return select_core_template(x, x.norm(dim=-1), 4, gamma, training=True).features

    def released():
        return _released_training_selection(x, x.norm(dim=-1), 4, gamma)

    core, grads = run(ours)
    expected_core, expected_grads = run(released)
    assert_rel_close(core, expected_core, 1e-6)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.abs().sum() > 0
        assert_rel_close(grad, expected, 1e-5)

    # The same picks from an explicit noise tensor: reproducible without the global generator.
    torch.manual_seed(1)
    noise = torch.stack([-torch.empty(2, 9).exponential_().log() for _ in range(4)])
    with torch.no_grad():
        explicit = select_core_template(x, x.norm(dim=-1), 4, gamma, training=True, noise=noise)
    assert_rel_close(explicit.features, core.detach(), 1e-6)


def _lightning_layout(state_dict: dict, prefix: str) -> dict:
    checkpoint = {f"{prefix}{key}": value for key, value in state_dict.items()}
    checkpoint["model.body.0.weight"] = torch.zeros(3, 3)
    checkpoint["center.weight"] = torch.zeros(10, 512)
    return {"epoch": 3, "state_dict": checkpoint}


@torch.no_grad()
def test_caface_loader_accepts_released_layouts(caface_cases, tmp_path):
    case = caface_cases[1]
    path = tmp_path / "caface.ckpt"
    torch.save(_lightning_layout(case["state_dict"], "aggregator."), path)
    expected = CAFaceReference.from_state_dict(case["state_dict"])(
        case["features"], case["style_stats"]
    )
    for source in [case["state_dict"], path, str(path)]:
        model = load_caface_reference(source)
        assert not model.training
        assert_same_state_dict(model.state_dict(), case["state_dict"])
        out = model(case["features"], case["style_stats"])
        assert torch.equal(out.aggregated, expected.aggregated)


@torch.no_grad()
def test_facecoresetnet_loader_accepts_released_layouts(facecoresetnet_fixture, tmp_path):
    case = facecoresetnet_fixture["cases"][0]
    state_dict = facecoresetnet_state_dict(facecoresetnet_fixture, case)
    prefixed = {f"aggregate_model.{k}": v for k, v in state_dict.items()}
    path = tmp_path / "facecoresetnet.ckpt"
    torch.save(_lightning_layout(state_dict, "aggregate_model."), path)
    for source in [state_dict, prefixed, path]:
        model = load_facecoresetnet_reference(source, coreset_size=case["coreset_size"])
        assert_same_state_dict(model.state_dict(), state_dict)
        out = model(case["embeddings"], case["norms"])
        assert_rel_close(out.aggregated, case["aggregated"], RTOL)


def test_loaders_name_missing_and_unexpected_keys(caface_cases, facecoresetnet_fixture):
    state_dict = dict(caface_cases[0]["state_dict"])
    del state_dict["fusion_net.conf_mlp.0.skip_connect_gate"]
    state_dict["fusion_net.conf_mlp.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as info:
        load_caface_reference({"state_dict": {f"aggregator.{k}": v for k, v in state_dict.items()}})
    assert info.value.missing == ["fusion_net.conf_mlp.0.skip_connect_gate"]
    assert info.value.unexpected == ["fusion_net.conf_mlp.0.extra"]
    message = str(info.value)
    assert "missing keys (1): fusion_net.conf_mlp.0.skip_connect_gate" in message
    assert "unexpected keys (1): fusion_net.conf_mlp.0.extra" in message

    state_dict = dict(facecoresetnet_fixture["state_dict"])
    del state_dict["tau"]
    with pytest.raises(CheckpointKeyError, match=r"missing keys \(1\): tau"):
        load_facecoresetnet_reference(state_dict)
    with pytest.raises(ValueError, match=r"no key 'pos_trans_norm\.weight'"):
        load_facecoresetnet_reference({"model.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="checkpoint path or a state dict"):
        load_caface_reference(3)
