"""fusedset.ClusterState: chunked sums against the one-shot op, merging, all_reduce, and its
checks (a rejected update or load leaves the state as it was)."""

import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import cluster_accumulate, cluster_accumulate_caface

from .helpers import assert_rel_close, free_port


def truth(keys, queries, values, scale):
    return reference.cluster_accumulate(keys.double(), queries.double(), values.double(), scale)


def chunked_problem(sizes=(5, 1, 17, 9, 30), seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    keys = torch.randn(2, n, 8, generator=generator) * 2
    queries = torch.randn(1, 4, 8, generator=generator)
    values = torch.randn(2, n, 6, generator=generator)
    chunks = [
        (keys[:, s : s + k], values[:, s : s + k])
        for s, k in zip(torch.tensor((0, *sizes)).cumsum(0).tolist(), sizes, strict=False)
    ]
    return keys, queries, values, chunks


def state_of(chunks, queries, order=None):
    state = fusedset.ClusterState()
    for i in order or range(len(chunks)):
        keys, values = chunks[i]
        state.accumulate(keys, queries, values, chunk=i)
    return state


def test_state_paper_chunked_equals_one_shot():
    keys, queries, values, chunks = chunked_problem()
    num, den = truth(keys, queries, values, 8**-0.5)
    assert_rel_close(state_of(chunks, queries).result("paper"), num / den.unsqueeze(-1), 1e-6)


def test_state_official_is_the_released_memory_mode():
    _, queries, _, chunks = chunked_problem()
    clipped, total = 0, 0
    for k, v in chunks:
        num, den = truth(k, queries, v, 8**-0.5)
        clipped = clipped + den.clamp(max=1).unsqueeze(-1) * num
        total = total + den
    got = state_of(chunks, queries).result("official")
    assert_rel_close(got, clipped / total.unsqueeze(-1), 1e-6)


@pytest.mark.parametrize("normalization", ["paper", "official"])
def test_state_is_independent_of_chunk_order(normalization):
    _, queries, _, chunks = chunked_problem()
    first = state_of(chunks, queries).result(normalization)
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        assert_rel_close(state_of(chunks, queries, order).result(normalization), first, 1e-6)


def test_state_merge_equals_one_state():
    _, queries, _, chunks = chunked_problem()
    merged = state_of(chunks[:2], queries).merge(state_of(chunks[2:], queries))
    whole = state_of(chunks, queries)
    assert merged.chunks == whole.chunks == 5
    for normalization in ("paper", "official"):
        assert_rel_close(merged.result(normalization), whole.result(normalization), 1e-12)
    assert fusedset.ClusterState().merge(whole).result().equal(whole.result())


def test_state_dict_round_trips_exactly(tmp_path):
    _, queries, _, chunks = chunked_problem()
    state = state_of(chunks, queries)
    torch.save(state.state_dict(), tmp_path / "state.pt")
    loaded = fusedset.ClusterState().load_state_dict(
        torch.load(tmp_path / "state.pt", weights_only=True)
    )
    assert loaded.chunks == state.chunks
    for normalization in ("paper", "official"):
        assert torch.equal(loaded.result(normalization), state.result(normalization))
    loaded.accumulate(chunks[0][0], queries, chunks[0][1])
    assert loaded.chunks == 6


def snapshot(state):
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.state_dict().items()
    }


def assert_unchanged(state, before):
    after = state.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_state_rejects_non_finite_chunk_and_stays_unchanged(bad):
    _, queries, _, chunks = chunked_problem()
    state = state_of(chunks[:2], queries)
    before = snapshot(state)
    keys, values = (t.clone() for t in chunks[2])
    values[1, 3, 2] = bad
    with pytest.raises(
        ValueError,
        match=r"^ClusterState.update: chunk probe-7 has NaN or Inf in num; the state is unchanged",
    ):
        state.accumulate(keys, queries, values, chunk="probe-7")
    assert_unchanged(state, before)
    keys[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"chunk 2 has NaN or Inf in num"):
        state.accumulate(keys, queries, chunks[2][1])
    assert_unchanged(state, before)


def test_state_rejects_mismatched_chunks_and_stays_unchanged():
    _, queries, _, chunks = chunked_problem()
    state = state_of(chunks[:2], queries)
    before = snapshot(state)
    num, den = cluster_accumulate(chunks[2][0], queries, chunks[2][1])
    with pytest.raises(ValueError, match=r"has num of shape \(1, 4, 6\), the state \(2, 4, 6\)"):
        state.update(num[:1], den[:1])
    with pytest.raises(TypeError, match=r"has dtype torch.float64, the state holds torch.float32"):
        state.update(num.double(), den.double())
    with pytest.raises(ValueError, match=r"is on meta, the state on cpu"):
        state.update(num.to("meta"), den.to("meta"))
    with pytest.raises(ValueError, match=r"num must be \(B, M, C\) and den \(B, M\)"):
        state.update(num, den[:, :3])
    with pytest.raises(ValueError, match=r"adds the token_num stream the state lacks"):
        state.update(num, den, torch.zeros(2, 4, 8))
    assert_unchanged(state, before)


def test_state_result_needs_an_image():
    state = fusedset.ClusterState()
    with pytest.raises(RuntimeError, match=r"the state has seen no image"):
        state.result()
    state.accumulate(torch.randn(2, 0, 8), torch.randn(1, 4, 8), torch.randn(2, 0, 6))
    with pytest.raises(RuntimeError, match=r"the state has seen no image"):
        state.result("official")
    with pytest.raises(ValueError, match=r"normalization must be 'paper' or 'official'"):
        state.result("both")


def test_state_token_stream_from_the_caface_form():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 40, 8, generator=generator)
    features = torch.randn(2, 40, 12, generator=generator) * 5
    centers = torch.randn(1, 4, 8, generator=generator)
    bias = torch.randn(1, 4, generator=generator)
    state = fusedset.ClusterState()
    for s in (slice(0, 15), slice(15, 40)):
        f_num, t_num, den = cluster_accumulate_caface(
            tokens[:, s], features[:, s], centers, bias, 0.3
        )
        state.update(f_num, den, t_num)
    f_num, t_num, den = reference.cluster_accumulate_caface(tokens, features, centers, bias, 0.3)
    assert_rel_close(state.result(), f_num / den.unsqueeze(-1), 1e-6)
    assert_rel_close(state.token_result(), t_num / den.unsqueeze(-1), 1e-6)
    assert state.token_result("official").shape == (2, 4, 8)


DISTRIBUTED_WORKER = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import fusedset

def work(rank, world, port, out, n_chunks):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 8, generator=generator)
    state = fusedset.ClusterState()
    for i in range(n_chunks):
        keys = torch.randn(2, 7 + i, 8, generator=generator)
        values = torch.randn(2, 7 + i, 6, generator=generator)
        if i % world == rank:
            state.accumulate(keys, queries, values, chunk=i)
    state.all_reduce()
    if rank == 0:
        torch.save(state.state_dict(), out)
    dist.destroy_process_group()

if __name__ == "__main__":
    port, out, n_chunks = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    mp.spawn(work, args=(2, port, out, n_chunks), nprocs=2)
"""


@pytest.mark.slow
def test_state_all_reduce_across_two_gloo_processes(tmp_path):
    import subprocess
    import sys

    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_WORKER)
    out = tmp_path / "state.pt"
    result = subprocess.run(
        [sys.executable, str(script), str(port), str(out), "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    distributed = fusedset.ClusterState().load_state_dict(torch.load(out, weights_only=True))
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 8, generator=generator)
    single = fusedset.ClusterState()
    for i in range(5):
        keys = torch.randn(2, 7 + i, 8, generator=generator)
        values = torch.randn(2, 7 + i, 6, generator=generator)
        single.accumulate(keys, queries, values)
    assert distributed.chunks == 5
    for normalization in ("paper", "official"):
        assert_rel_close(distributed.result(normalization), single.result(normalization), 1e-6)


# -- load_state_dict and update check everything before they change the state ------------------


def caface_state():
    """A state with the token stream, of B = 2 probes and M = 4 centers."""
    generator = torch.Generator().manual_seed(1)
    state = fusedset.ClusterState()
    for n in (5, 9):
        tokens = torch.randn(2, n, 8, generator=generator)
        features = torch.randn(2, n, 12, generator=generator) * 5
        centers = torch.randn(1, 4, 8, generator=generator)
        bias = torch.randn(1, 4, generator=generator)
        f_num, t_num, den = cluster_accumulate_caface(tokens, features, centers, bias, 0.3)
        state.update(f_num, den, t_num)
    return state


def poisoned(key, value):
    return lambda s: s.__setitem__(key, value(s[key]) if callable(value) else value)


def with_nan(key):
    def put(t):
        t = t.clone()
        t.view(-1)[1] = float("nan")
        return t

    return poisoned(key, put)


# id -> (how the saved state is spoiled, the error, its message after the prefix)
BAD_STATES = {
    # A den of one probe for B = 2 would broadcast in result(): silently wrong.
    "den_one_probe": (
        poisoned("den", lambda t: t[:1]),
        ValueError,
        r"den must have shape \(2, 4\) \(num has \(2, 4, 12\)\), got \(1, 4\)",
    ),
    "num_2d": (poisoned("num", lambda t: t[0]), ValueError, r"num must have shape \(B, M, C\)"),
    "clipped_num_narrow": (
        poisoned("clipped_num", lambda t: t[..., :5]),
        ValueError,
        r"clipped_num must have shape \(2, 4, 12\)",
    ),
    "token_num_0d": (
        poisoned("token_num", lambda t: t[0, 0, 0]),
        ValueError,
        r"token_num must have shape \(2, 4, 'D'\) \(num has \(2, 4, 12\)\), got \(\)",
    ),
    "clipped_token_num_narrow": (
        poisoned("clipped_token_num", lambda t: t[..., :3]),
        ValueError,
        r"clipped_token_num must have shape \(2, 4, 8\) \(num has \(2, 4, 12\)\), got \(2, 4, 3\)",
    ),
    "num_nan": (with_nan("num"), ValueError, r"num holds NaN or Inf"),
    "den_nan": (with_nan("den"), ValueError, r"den holds NaN or Inf"),
    "clipped_token_num_nan": (
        with_nan("clipped_token_num"),
        ValueError,
        r"clipped_token_num holds NaN or Inf",
    ),
    "den_negative": (poisoned("den", lambda t: -t), ValueError, r"den holds a negative value"),
    "num_float32": (
        poisoned("num", lambda t: t.float()),
        TypeError,
        r"num must be a float64 tensor, got torch.float32",
    ),
    "den_list": (
        poisoned("den", lambda t: t.tolist()),
        TypeError,
        r"den must be a float64 tensor, got list",
    ),
    "num_elsewhere": (
        poisoned("num", lambda t: t.to("meta")),
        ValueError,
        r"clipped_num is on cpu, num on meta",
    ),
    "chunks_negative": (poisoned("chunks", -1), ValueError, r"chunks must be an integer >= 0"),
    "chunks_float": (poisoned("chunks", 2.5), ValueError, r"chunks must be .*, got 2.5"),
    "chunks_bool": (poisoned("chunks", True), ValueError, r"chunks must be .*, got True"),
    "chunks_zero": (poisoned("chunks", 0), ValueError, r"a state with sums has seen at least one"),
    "dtype_int64": (
        poisoned("dtype", "int64"),
        ValueError,
        r"dtype must be one of float16, bfloat16, float32, float64, got 'int64'",
    ),
    "dtype_unknown": (poisoned("dtype", "nonsense"), ValueError, r"dtype must be one of "),
    "dtype_none": (poisoned("dtype", None), ValueError, r"dtype must be one of .*, got None"),
    "key_missing": (
        lambda s: s.pop("clipped_num"),
        ValueError,
        r"expected keys num, clipped_num, den, token_num, clipped_token_num \(the token ones "
        r"optional\), chunks and dtype; got \['chunks', 'clipped_token_num', 'den'",
    ),
    "token_key_missing": (lambda s: s.pop("clipped_token_num"), ValueError, r"expected keys "),
    "key_unknown": (poisoned("extra", 1), ValueError, r"expected keys .*'dtype', 'extra'"),
}


@pytest.mark.parametrize(("corrupt", "error", "message"), BAD_STATES.values(), ids=BAD_STATES)
def test_load_state_dict_refuses_a_bad_state_and_keeps_its_own(corrupt, error, message):
    state = caface_state()
    before = snapshot(state)
    saved = caface_state().state_dict()
    corrupt(saved)
    with pytest.raises(error, match=rf"^ClusterState.load_state_dict: {message}"):
        state.load_state_dict(saved)
    assert_unchanged(state, before)
    assert state.token_result().shape == (2, 4, 8)


def test_load_state_dict_of_an_empty_state_and_its_checks():
    state = caface_state()
    empty = fusedset.ClusterState().state_dict()
    assert empty == {"chunks": 0, "dtype": None}
    assert fusedset.ClusterState().load_state_dict(empty).empty
    with pytest.raises(ValueError, match=r"a state without sums has chunks 0 and dtype None"):
        state.load_state_dict({"chunks": 3, "dtype": None})
    with pytest.raises(TypeError, match=r"expected a mapping from state_dict\(\), got list"):
        state.load_state_dict([("chunks", 0)])
    assert state.chunks == 2
    # A loaded state is a copy: changing the dict afterwards does not reach it.
    saved = state.state_dict()
    loaded = fusedset.ClusterState().load_state_dict(saved)
    saved["num"].zero_()
    assert torch.equal(loaded.result(), state.result())


def test_update_refuses_negative_den_integer_sums_and_mixed_devices():
    state = caface_state()
    before = snapshot(state)
    num = torch.rand(2, 4, 12)
    den = torch.rand(2, 4)
    tokens = torch.rand(2, 4, 8)
    bad_den = den.clone()
    bad_den[1, 2] = -0.25
    with pytest.raises(ValueError, match=r"^ClusterState.update: chunk 2 has a negative den"):
        state.update(num, bad_den, tokens)
    with pytest.raises(
        TypeError,
        match=r"^ClusterState.update: chunk 2: num must have dtype float16, bfloat16, float32, "
        r"float64, got torch.int64",
    ):
        state.update(torch.ones(2, 4, 12, dtype=torch.int64), den, tokens)
    with pytest.raises(TypeError, match=r"chunk x: den must have dtype .*, got torch.int32"):
        state.update(num, torch.ones(2, 4, dtype=torch.int32), tokens, chunk="x")
    with pytest.raises(ValueError, match=r"chunk 2: token_num is on meta, num on cpu"):
        state.update(num, den, tokens.to("meta"))
    assert_unchanged(state, before)
    fresh = fusedset.ClusterState()
    with pytest.raises(ValueError, match=r"chunk 0 has a negative den"):
        fresh.update(num, bad_den)
    assert fresh.empty
    assert fresh.chunks == 0
