"""Block-by-block calibration (loranull_mini/calibration.py) against all-at-once collection and
against the plain hook of nullspace.py.

Block by block, the calibration tokens go through one transformer block at a time and each
block's adapters are initialised before the next block runs, so only one block's
covariances are alive. It must give exactly what collecting over the whole model gives:
the same covariances, and the same adapters as inject_lora after collect_covariances.
"""
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora
import nullspace as ns
from loranull_mini import calibration as cal
from loranull_mini import fastbasis as fb
from tests.conftest import random_model


def padded_batches(seed=0):
    """Three batches: no padding, right padding, left padding (pad id 0 marked False)."""
    g = torch.Generator().manual_seed(seed)
    plain = torch.randint(1, 97, (3, 40), generator=g)
    right = torch.randint(1, 97, (2, 24), generator=g)
    right_keep = torch.ones_like(right, dtype=torch.bool)
    right_keep[0, 17:] = False
    left = torch.randint(1, 97, (2, 30), generator=g)
    left_keep = torch.ones_like(left, dtype=torch.bool)
    left_keep[1, :11] = False
    return [(plain, None), (right.masked_fill(~right_keep, 0), right_keep),
            (left.masked_fill(~left_keep, 0), left_keep)]


def all_at_once_and_blockwise(dtype, targets=ns.ALL_TARGETS, **kwargs):
    model = random_model(std=0.1)
    batches = padded_batches()
    reference = cal.calibrate(model, batches, targets, dtype=dtype, **kwargs)
    blockwise = cal.calibrate_blockwise(model, batches, targets, dtype=dtype, **kwargs)
    return reference, blockwise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blockwise_covariances_equal_all_at_once_collection(dtype):
    reference, blockwise = all_at_once_and_blockwise(dtype)
    assert list(blockwise) == list(reference)
    for name in reference:
        assert blockwise[name].dtype == torch.float64
        assert torch.equal(blockwise[name], reference[name]), name


def test_blockwise_respects_targets_and_per_sample_max_norm():
    reference, blockwise = all_at_once_and_blockwise(torch.float32, ("v", "down"), per_sample_max_norm=True)
    assert sorted(blockwise) == sorted(reference) == sorted(
        f"layers.{i}.{p}" for i in range(2) for p in ("attention.wv", "feed_forward.w_down"))
    for name in reference:
        assert torch.equal(blockwise[name], reference[name]), name


def test_blockwise_shares_one_covariance_per_input_also_when_moved():
    model = random_model()
    covariances = cal.calibrate_blockwise(model, padded_batches(), covariance_device="cpu",
                                         hidden_device="cpu")
    for i in range(2):
        q, k, v = (covariances[f"layers.{i}.attention.w{p}"] for p in "qkv")
        assert q is k and k is v
        assert covariances[f"layers.{i}.feed_forward.w_gate"] is covariances[f"layers.{i}.feed_forward.w_up"]


def test_each_block_is_handed_over_complete_and_then_freed():
    """init_block(i) sees only block i; with keep_covariances=False nothing of block i
    outlives the call: memory does not grow with depth."""
    model = random_model()
    reference = cal.calibrate(model, padded_batches())
    seen, alive = [], []

    def init_block(i, covariances):
        gc.collect()
        alive.append(sum(ref() is not None for ref in previous))
        seen.append(i)
        assert all(name.startswith(f"layers.{i}.") for name in covariances)
        assert {n for n in reference if n.startswith(f"layers.{i}.")} == set(covariances)
        for name, C in covariances.items():
            assert torch.equal(C, reference[name])
        previous[:] = [weakref.ref(C) for C in covariances.values()]

    previous = []
    kept = cal.calibrate_blockwise(model, padded_batches(), init_block=init_block, keep_covariances=False)
    assert kept == {} and seen == [0, 1] and alive == [0, 0]


@pytest.mark.parametrize("init", ["null", "corda", "vanilla", "pissa", "milora", "top", "space"])
def test_blockwise_injection_equals_inject_lora_after_collection(init):
    """With the default (eigh) null basis, as nullspace.py computes it: bit for bit. The fast
    basis is compared with it in test_fast_null_basis_*."""
    batches = padded_batches()
    reference_model, model = random_model(std=0.1), random_model(std=0.1)
    covariances = cal.calibrate(reference_model, batches, dtype=torch.float32)
    reference = ns.inject_adapters(reference_model, r=4, alpha=8, init=init, covariances=covariances,
                                   freeze_A=init == "null", seed=5)
    layers, blockwise_covariances = cal.inject_blockwise(model, batches, r=4, alpha=8, init=init,
                                                        freeze_A=init == "null", seed=5, dtype=torch.float32)
    assert list(layers) == list(reference)
    for name, layer in layers.items():
        assert torch.equal(blockwise_covariances[name], covariances[name])
        for key in ("A", "B", "A0", "B0"):
            ours, theirs = getattr(layer, key), getattr(reference[name], key)
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert torch.equal(ours, theirs), (name, key)
        assert torch.equal(layer.base.weight, reference[name].base.weight), name
        assert layer.A.requires_grad == (init != "null") and layer.B.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith((".A", ".B")))


def test_blockwise_null_init_keeps_the_model_output():
    model = random_model(std=0.1)
    idx = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before, _ = model(idx)
    cal.inject_blockwise(model, padded_batches(), r=8, alpha=16, init="null")
    with torch.no_grad():
        after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_blockwise_restores_the_training_flag_and_removes_hooks_after_an_error():
    model = random_model().train()
    with torch.no_grad():
        model.layers[1].attention_norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf .* entering layers\.1\.attention\.wq"):
        cal.calibrate_blockwise(model, padded_batches())
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="pad_mask shape"):
        cal.calibrate_blockwise(model, [(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))])


def _blockwise_rank(rank, world, init_file, batches, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        covariances = cal.calibrate_blockwise(random_model(), batches[rank::world], distributed=True)
        if rank == 0:
            torch.save(covariances, out)
    finally:
        dist.destroy_process_group()


def test_distributed_blockwise_sums_the_shares_of_all_ranks(tmp_path):
    batches = padded_batches()
    mp.spawn(_blockwise_rank, args=(2, tmp_path / "init", batches, tmp_path / "c.pt"), nprocs=2)
    summed = torch.load(tmp_path / "c.pt")
    reference = cal.calibrate(random_model(), batches)
    for name in reference:  # the same sums, added in another order
        torch.testing.assert_close(summed[name], reference[name], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the products
@pytest.mark.parametrize("N, n, blocks", [(50, 300, 4), (33, 257, 4), (20, 512, 3), (10, 100, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_from_the_lower_blocks_adds_the_full_product(N, n, blocks, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(N, n, generator=g, dtype=dtype)
    S = torch.randn(n, n, generator=g, dtype=torch.float64)
    expected = S + (x.T @ x).double()
    assert cal.add_gram_(S, x, blocks) is S
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(S, expected, rtol=tol, atol=tol)


def test_nonfinite_activations_are_caught_through_the_products_diagonal():
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(2, 8, 300)
        x[1, 5, 123] = bad
        collector = cal.CovarianceCollector(random_model())
        with pytest.raises(ValueError, match="NaN/Inf .* entering layer"):
            collector._accumulate("layer", x, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blockwise_covariances_equal_the_plain_hook_of_nullspace(dtype):
    """The machinery (float32 or float64 products of the lower blocks, block by block)
    computes the covariances of the one-page hook in nullspace.py, to rounding."""
    model = random_model(std=0.1)
    plain = ns.collect_covariances(model, padded_batches())
    blockwise = cal.calibrate_blockwise(model, padded_batches(), dtype=dtype)
    assert list(blockwise) == list(plain)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for name, C in plain.items():
        torch.testing.assert_close(blockwise[name], C, rtol=0, atol=tolerance * float(C.abs().max()))
        assert torch.equal(blockwise[name], blockwise[name].T)


# ----------------------------------------------------------------------------- the fast null basis
def separated_covariance(n, r, seed=0):
    """r distinct small eigenvalues in [1e-3, 2e-3], then a gap of 500x to the rest."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    eigenvalues = torch.cat([torch.linspace(1e-3, 2e-3, r, dtype=torch.float64),
                             torch.logspace(0, 1, n - r, dtype=torch.float64)])
    C = (Q * eigenvalues) @ Q.T
    return (C + C.T) / 2


def energy_bound(C, r):
    """The captured energy's minimum (sum of the r smallest eigenvalues) and 1% of it plus
    the rounding floor r * eps * trace(C)."""
    minimum = float(torch.linalg.eigvalsh(C)[:r].sum())
    return minimum, 0.01 * minimum + r * torch.finfo(torch.float64).eps * float(torch.trace(C))


def layers_from(weights, r, alpha):
    torch.manual_seed(0)
    return {name: lora.LoRALinear(nn.Linear(W.shape[1], W.shape[0], bias=False).requires_grad_(False), r, alpha)
            for name, W in weights.items()}


@pytest.mark.parametrize("init", ["null", "space"])
def test_fast_null_basis_gives_the_eigh_adapters_on_a_separated_spectrum(init):
    n, r, alpha = 320, 8, 16
    C = separated_covariance(n, r)
    assert fb.smallest_eigenvectors(C, r, return_info=True)[1]["used"] == "krylov"  # not the eigh fallback
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(96, n, generator=g) / n ** 0.5, "b": torch.randn(400, n, generator=g) / n ** 0.5}
    results = {}
    for basis in ("fast", "eigh"):
        layers = layers_from(weights, r, alpha)
        for name, layer in layers.items():
            layer.base.weight.data.copy_(weights[name])
        ns.init_adapters(layers, init, dict.fromkeys(layers, C), basis=fb.smallest_eigenvectors if basis == "fast"
                         else ns.null_basis)
        results[basis] = layers
    minimum, slack = energy_bound(C, r)
    for name in weights:
        fast, exact = results["fast"][name], results["eigh"][name]
        s = fast.scaling
        torch.testing.assert_close(s * fast.B @ fast.A, s * exact.B @ exact.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.base.weight, exact.base.weight, rtol=0, atol=1e-6)
        A = fast.A.detach().double()
        energy = ns.captured_energy(A, C) * float(torch.trace(C))
        assert energy - minimum <= slack
        if init == "null":  # the original weight is kept: W = W_res + s B A
            torch.testing.assert_close(fast.base.weight + s * fast.B @ fast.A, weights[name], rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
@pytest.mark.parametrize("batches", ["few tokens (rank-deficient C)", "more tokens than features"])
def test_blockwise_fast_null_init_captures_the_minimum_energy(batches):
    """Real activations of a random model: a spectrum without a gap (or, with fewer tokens than
    features, a zero eigenspace larger than r, where any basis inside it is exact). The
    adapters' captured energy is compared, with the minimum and with the eigh path's."""
    r, config = 4, dict(dim=256, hidden_dim=512, max_seq_len=512)
    g = torch.Generator().manual_seed(2)
    data = padded_batches() if batches.startswith("few") else [torch.randint(1, 97, (4, 200), generator=g)]
    used, results = set(), {}
    original = fb.smallest_eigenvectors

    def recording(C, r, **kwargs):
        U, info = original(C, r, return_info=True, **kwargs)
        used.add(info["used"])
        return U

    for basis in ("fast", "eigh"):
        model = random_model(std=0.1, **config)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fb, "smallest_eigenvectors", recording)
            results[basis] = cal.inject_blockwise(model, data, r=r, alpha=8, init="null", dtype=torch.float64,
                                                  basis=fb.smallest_eigenvectors if basis == "fast" else ns.null_basis)
    assert used == {"krylov"}
    (fast, covariances), (exact, _) = results["fast"], results["eigh"]
    for name, layer in fast.items():
        C = covariances[name]
        minimum, slack = energy_bound(C, r)
        energy = ns.captured_energy(layer.A.detach().double(), C) * float(torch.trace(C))
        exact_energy = ns.captured_energy(exact[name].A.detach().double(), C) * float(torch.trace(C))
        assert energy - minimum <= slack, name
        assert abs(energy - exact_energy) <= slack, name
        torch.testing.assert_close(layer.base.weight + layer.scaling * layer.B @ layer.A,
                                   exact[name].base.weight + exact[name].scaling * exact[name].B @ exact[name].A,
                                   rtol=0, atol=1e-5)
