"""nullspace.py: calibration covariances, the null basis, LoRA-Null and CorDA inits, diagnostics.

The inits are checked on random matrices against their defining equations; the hooks are
checked on the tiny model against activations recorded by a plain hook of the test's own.
"""
import math
from collections import Counter

import pytest
import torch
from torch import nn

import nullspace as ns
from loranull_mini import calibration as cal
from model import PROJECTIONS
from tests.conftest import random_model

ALGO = {"loranull": ns.loranull_init, "corda": ns.corda_init}


def low_rank_inputs(N=200, k=20, n=40, seed=0, dtype=torch.float64):
    """X = Z @ M (N, n) of rank k: knowledge-like inputs with an exact null space of dim n - k."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(N, k, generator=g, dtype=dtype)
    M = torch.randn(k, n, generator=g, dtype=dtype)
    return Z @ M


def decaying_inputs(N=400, n=32, seed=0):
    """Full-rank X (N, n) whose singular values decay geometrically over 4 decades."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -4, n, dtype=torch.float64)
    return torch.randn(N, n, generator=g, dtype=torch.float64) * scales @ Q.T


def gram(X):
    return X.T @ X / X.shape[0]


def random_weight(m, n, seed=1, dtype=torch.float32):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) / math.sqrt(n)


# ----------------------------------------------------------------------------- the inits

@pytest.mark.parametrize("method", ["loranull", "corda"])
@pytest.mark.parametrize("m, n, r, alpha", [(24, 40, 6, 12.0), (48, 32, 8, 8.0), (40, 40, 40, 3.0)])
def test_residual_plus_scaled_adapter_equals_weight(method, m, n, r, alpha):
    W = random_weight(m, n)
    C = gram(decaying_inputs(n=n))
    A, B, W_res = ALGO[method](W, C, r, alpha)
    assert A.shape == (r, n) and B.shape == (m, r) and W_res.shape == (m, n)
    assert A.dtype == B.dtype == W_res.dtype == torch.float32
    torch.testing.assert_close(W_res + (alpha / r) * B @ A, W, rtol=0, atol=5e-6)


@pytest.mark.parametrize("method", ["loranull", "corda"])
def test_residual_does_not_depend_on_alpha(method):
    W, C = random_weight(24, 40, dtype=torch.float64), gram(decaying_inputs(n=40))
    _, _, W_res_1 = ALGO[method](W, C, 8, 1.0)
    _, _, W_res_2 = ALGO[method](W, C, 8, 64.0)
    torch.testing.assert_close(W_res_1, W_res_2, rtol=0, atol=1e-12)


def test_null_basis_is_orthonormal_eigenvectors_of_smallest_eigenvalues():
    C = gram(decaying_inputs(n=32))
    U = ns.null_basis(C, 5)
    eigenvalues = torch.linalg.eigvalsh(C)
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(C @ U, U * eigenvalues[:5], rtol=0, atol=1e-14)  # C u = lambda u


def test_rows_of_A_lie_in_the_null_basis():
    W, C = random_weight(24, 40), gram(decaying_inputs(n=40))
    A, _, _ = ns.loranull_init(W, C, 8, 16.0)
    U = ns.null_basis(C, 8)
    A64 = A.double()
    residual = A64 - A64 @ U @ U.T  # the part of each row outside span(U_null)
    assert residual.norm() / A64.norm() < 1e-6


def test_null_init_annihilates_calibration_inputs():
    X = low_rank_inputs(N=200, k=20, n=40)  # null space of dim 20 > r
    W = random_weight(24, 40)
    A, B, W_res = ns.loranull_init(W, gram(X), 8, 16.0)
    X32 = X.float()
    # A @ x ~ 0 on knowledge-like inputs, so the adapter's input is empty for them ...
    assert (X32 @ A.T).norm() / (X32.norm() * A.norm()) < 1e-6
    # ... and the residual weight alone already gives the pre-trained outputs on them.
    assert (X32 @ (W - W_res).T).norm() / (X32 @ W.T).norm() < 1e-5
    # A random adapter of the same size does not annihilate them.
    A_random = torch.randn(8, 40)
    assert (X32 @ A_random.T).norm() / (X32.norm() * A_random.norm()) > 0.05


@pytest.mark.parametrize("m, n, r", [(24, 40, 6), (48, 32, 8)])
def test_small_svd_factors_equal_full_svd_of_projected_weight(m, n, r):
    W = random_weight(m, n, dtype=torch.float64)
    C = gram(decaying_inputs(n=n))
    alpha = 2.0 * r
    s = alpha / r
    A, B, W_res = ns.loranull_init(W, C, r, alpha)

    # The reference code: full SVD of the (m, n) matrix W_null = W U U^T, top r triplets.
    U_null = ns.null_basis(C, r)
    W_null = W @ U_null @ U_null.T
    U_f, S_f, Vh_f = torch.linalg.svd(W_null, full_matrices=False)
    root = torch.sqrt(S_f[:r] / s)
    A_full, B_full = root[:, None] * Vh_f[:r], U_f[:, :r] * root

    torch.testing.assert_close(s * B @ A, W_null, rtol=0, atol=1e-12)
    torch.testing.assert_close(B @ A, B_full @ A_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(s * B @ A)[:r], S_f[:r], rtol=1e-10, atol=0)
    # Factors agree column by column up to the sign of each singular pair.
    sign = torch.sign((B * B_full).sum(0))  # (r,)
    torch.testing.assert_close(B * sign, B_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(A * sign[:, None], A_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(W_res, W - W_null, rtol=0, atol=1e-12)


def adapter_inputs_of_other_methods(W, C, r, alpha, n_random=20):
    """Down-projections A (r, n) of the other inits, built here from their definitions."""
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)
    g = torch.Generator().manual_seed(3)
    vanilla = torch.empty(r, W.shape[1], dtype=W.dtype)
    nn.init.kaiming_uniform_(vanilla, a=math.sqrt(5), generator=g)
    others = {
        "pissa": Vh[:r],  # largest singular directions of W
        "milora": Vh[-r:],  # smallest singular directions of W
        "vanilla": vanilla,
        "corda": ns.corda_init(W, C, r, alpha)[0],
    }
    for i in range(n_random):  # random r-dimensional subspaces
        Q, _ = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=W.dtype))
        others[f"random{i}"] = Q.T
    return others


def test_null_init_captures_the_least_calibration_energy():
    n, r = 32, 6
    W = random_weight(48, n, dtype=torch.float64)
    C = gram(decaying_inputs(n=n))
    A, _, _ = ns.loranull_init(W, C, r, 2.0 * r)
    energy = ns.captured_energy(A, C)

    # The provable minimum (Ky Fan): the sum of the r smallest eigenvalues over the trace.
    eigenvalues = torch.linalg.eigvalsh(C)
    assert energy == pytest.approx(float(eigenvalues[:r].sum() / eigenvalues.sum()), rel=1e-8)
    for name, A_other in adapter_inputs_of_other_methods(W, C, r, 2.0 * r).items():
        assert energy < ns.captured_energy(A_other, C), name
    # PiSSA / MiLoRA directions of W are blind to the activations: they capture far more.
    others = adapter_inputs_of_other_methods(W, C, r, 2.0 * r, n_random=0)
    assert ns.captured_energy(others["milora"], C) > 100 * energy


def test_null_init_on_a_bfloat16_model_keeps_A_float32_at_the_minimum_energy():
    # A rounded to bfloat16 (8 bits of mantissa) leaks the large eigenvalues into its row space:
    # 6 to 15 times the minimum here, against a relative error of 1e-8 in float32
    model = random_model().to(torch.bfloat16)
    names = ["layers.0.attention.wq", "layers.1.attention.wq", "layers.0.feed_forward.w_down",
             "layers.1.feed_forward.w_down"]
    C = {name: gram(decaying_inputs(n=model.get_submodule(name).weight.shape[1], seed=i))
         for i, name in enumerate(names)}
    layers = ns.inject_adapters(model, ("q", "down"), r=8, alpha=16, init="null", covariances=C)
    assert sorted(layers) == sorted(names)
    for name, layer in layers.items():
        eigenvalues = torch.linalg.eigvalsh(C[name])
        minimum = float(eigenvalues[:8].sum() / eigenvalues.sum())
        assert ns.captured_energy(layer.A, C[name]) == pytest.approx(minimum, rel=1e-6), name
        assert layer.A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16


def test_captured_energy_uses_the_row_space_of_a_rank_deficient_A():
    C = gram(decaying_inputs(n=16))
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(2, 16, generator=g, dtype=torch.float64)
    rank_two = torch.stack([a1, a2])
    repeated = torch.stack([a1, 2 * a1, a2, a1 - a2])  # 4 rows, still rank 2
    assert ns.captured_energy(repeated, C) == pytest.approx(ns.captured_energy(rank_two, C), rel=1e-10)
    assert ns.captured_energy(torch.randn(16, 16, generator=g, dtype=torch.float64), C) == pytest.approx(1.0)
    Q, _ = torch.linalg.qr(rank_two.T)  # orthonormal basis of the same plane
    expected = torch.trace(Q.T @ C @ Q) / torch.trace(C)
    assert ns.captured_energy(rank_two, C) == pytest.approx(float(expected), rel=1e-10)


def test_knowledge_disturbance_equals_output_change_on_calibration_inputs():
    X = decaying_inputs(n=32)
    W = random_weight(20, 32, dtype=torch.float64)
    dW = random_weight(20, 32, seed=5, dtype=torch.float64) * 0.1
    explicit = (X @ dW.T).norm() / (X @ W.T).norm()
    energy = ns.output_energy(W, gram(X))
    assert energy == pytest.approx(float((X @ W.T).norm() ** 2 / len(X)), rel=1e-10)
    # the dense update as F @ G with G = I, and a low-rank update given by its factors
    assert ns.knowledge_disturbance(dW, torch.eye(32, dtype=torch.float64), gram(X), energy) == pytest.approx(
        float(explicit), rel=1e-10)
    F, G = dW[:, :3], random_weight(3, 32, seed=6, dtype=torch.float64)
    low_rank = (X @ (F @ G).T).norm() / (X @ W.T).norm()
    assert ns.knowledge_disturbance(F, G, gram(X), energy) == pytest.approx(float(low_rank), rel=1e-10)


def test_frozen_null_A_makes_any_B_update_invisible_to_knowledge_inputs():
    # LoRA-Null v2: dW = s * dB @ A with A frozen; dB arbitrary.
    X = low_rank_inputs(N=200, k=20, n=40)
    W = random_weight(24, 40, dtype=torch.float64)
    C = gram(X)
    A, _, _ = ns.loranull_init(W, C, 8, 16.0)
    dB = torch.randn(24, 8, dtype=torch.float64)
    assert ns.knowledge_disturbance(2.0 * dB, A.double(), C, ns.output_energy(W, C)) < 1e-6
    # The same update through a PiSSA-like A disturbs them.
    A_pissa = torch.linalg.svd(W, full_matrices=False)[2][:8]
    assert ns.knowledge_disturbance(2.0 * dB, A_pissa, C, ns.output_energy(W, C)) > 0.1


# ----------------------------------------------------------------------------- CorDA

def inverse_error_float32(C_damped):
    C32 = C_damped.float()
    return float(torch.dist(C32 @ torch.linalg.inv(C32), torch.eye(C32.shape[0])))


def test_corda_damping_stops_at_the_first_passing_doubling():
    # An ill-conditioned C and a tolerance strict enough to need several doublings.
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    C = Q @ torch.diag(torch.logspace(0, -12, 32, dtype=torch.float64)) @ Q.T
    tol = 1e-5
    C_damped, d = ns.damped_covariance(C, tol=tol)
    eye = torch.eye(32, dtype=torch.float64)
    scale = C.diagonal().mean()
    assert d > 0.01 and math.log2(d / 0.01) == pytest.approx(round(math.log2(d / 0.01)))
    torch.testing.assert_close(C_damped, C + d * scale * eye, rtol=0, atol=0)
    assert inverse_error_float32(C_damped) < tol  # passes at d ...
    assert inverse_error_float32(C + (d / 2) * scale * eye) >= tol  # ... failed at d / 2


def test_corda_damping_keeps_the_start_value_when_it_passes():
    C = gram(decaying_inputs(n=32))
    C_damped, d = ns.damped_covariance(C)
    assert d == 0.01
    assert inverse_error_float32(C_damped) < 0.05
    torch.testing.assert_close(C_damped, C + 0.01 * C.diagonal().mean() * torch.eye(32, dtype=torch.float64))


def test_corda_knowledge_preserved_mode_takes_the_smallest_components():
    W = random_weight(24, 40, dtype=torch.float64)
    C = gram(decaying_inputs(n=40))
    r, alpha = 6, 3.0
    A, B, _ = ns.corda_init(W, C, r, alpha)
    C_damped, _ = ns.damped_covariance(C)
    # s B A C' = U_r diag(S_r) V_r^T: its singular values are the r smallest of W C'.
    adapter = (alpha / r) * B @ A @ C_damped
    torch.testing.assert_close(torch.linalg.svdvals(adapter)[:r],
                               torch.linalg.svdvals(W @ C_damped)[-r:], rtol=1e-8, atol=0)
    # and its column space is spanned by the matching left singular vectors of W C'.
    U_small = torch.linalg.svd(W @ C_damped, full_matrices=False)[0][:, -r:]
    torch.testing.assert_close(U_small @ U_small.T @ adapter, adapter, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- diagnostics

def test_effective_rank_of_known_spectra():
    flat = ns.effective_rank(torch.ones(10))
    assert flat["erank"] == pytest.approx(10.0) and flat["n90"] == 9 and flat["n99"] == 10
    one = ns.effective_rank(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert one == {"erank": pytest.approx(1.0), "n90": 1, "n99": 1}
    # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2, erank 2^1.5.
    assert ns.effective_rank(torch.tensor([2.0, 1.0, 1.0]))["erank"] == pytest.approx(2 ** 1.5)
    # energies 50, 30, 10, 5, 4, 1 (of 100), given unsorted: 90% after 3, 99% after 5.
    energy = torch.tensor([10.0, 50.0, 1.0, 30.0, 4.0, 5.0], dtype=torch.float64)
    counts = ns.effective_rank(energy.sqrt())
    assert (counts["n90"], counts["n99"]) == (3, 5)


def test_activation_singular_values_are_those_of_X_over_sqrt_N():
    X = decaying_inputs(N=100, n=24)
    expected = torch.linalg.svdvals(X) / math.sqrt(100)
    torch.testing.assert_close(ns.activation_singular_values(gram(X)), expected, rtol=1e-8, atol=1e-12)
    W = random_weight(8, 24)
    torch.testing.assert_close(ns.weight_singular_values(W), torch.linalg.svdvals(W.double()))


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("method", ["loranull", "corda"])
def test_inits_reject_bad_inputs(method):
    init = ALGO[method]
    W, C = random_weight(12, 20), gram(decaying_inputs(n=20))
    with pytest.raises(ValueError, match=r"rank r=0 must satisfy 1 <= r <= min\(m, n\) = 12"):
        init(W, C, 0, 1.0)
    with pytest.raises(ValueError, match=r"rank r=13 must satisfy"):
        init(W, C, 13, 1.0)
    with pytest.raises(ValueError, match=r"covariance shape \(12, 12\) does not match W 12x20"):
        init(W, C[:12, :12], 4, 1.0)
    C_bad = C.clone()
    C_bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="covariance contains NaN/Inf"):
        init(W, C_bad, 4, 1.0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        init(W, C, 4, 0.0)


def test_diagnostics_reject_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        ns.null_basis(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match=r"rank r=5 must satisfy 1 <= r <= n = 4"):
        ns.null_basis(torch.eye(4), 5)
    with pytest.raises(ValueError, match="undefined"):
        ns.effective_rank(torch.zeros(5))
    with pytest.raises(ValueError, match=">= 0"):
        ns.effective_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="expected A"):
        ns.captured_energy(torch.ones(2, 5), torch.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        ns.knowledge_disturbance(torch.ones(3, 4), torch.ones(3, 5), torch.eye(5), 1.0)


# ----------------------------------------------------------------------------- hooks

def record_linear_inputs(model, batches):
    """{layer name: inputs (N, n) of real tokens}, recorded by a plain hook of our own."""
    recorded = {f"layers.{i}.{path}": [] for i in range(len(model.layers)) for path in PROJECTIONS.values()}
    handles = []
    try:
        for name, chunks in recorded.items():
            def hook(module, args, chunks=chunks):
                chunks.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            for idx, keep in batches:
                start = {name: len(chunks) for name, chunks in recorded.items()}
                model(idx, pad_mask=keep)
                if keep is not None:  # keep real tokens only
                    for name, chunks in recorded.items():
                        chunks[start[name]] = chunks[start[name]][keep.reshape(-1)]
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks).double() for name, chunks in recorded.items()}


def has_no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def calibration_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 97, (3, 40), generator=g), None),
            (torch.randint(1, 97, (2, 25), generator=g), None)]


def test_hook_covariances_equal_gram_of_recorded_inputs():
    model = random_model()
    batches = calibration_batches()
    covariances = ns.collect_covariances(model, batches)
    recorded = record_linear_inputs(model, batches)
    assert set(covariances) == set(recorded)
    for name, X in recorded.items():
        assert X.shape[0] == 3 * 40 + 2 * 25
        torch.testing.assert_close(covariances[name], gram(X), rtol=1e-12, atol=1e-15)
        assert torch.equal(covariances[name], covariances[name].T)
    assert has_no_hooks(model)


def test_float32_products_match_float64_covariances():
    model = random_model()
    batches = calibration_batches()
    C64 = ns.collect_covariances(model, batches)
    C32 = cal.calibrate(model, batches, dtype=torch.float32)
    for name in C64:
        assert C32[name].dtype == torch.float64
        torch.testing.assert_close(C32[name], C64[name], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_covariances(side):
    model = random_model()
    g = torch.Generator().manual_seed(1)
    short, long = torch.randint(1, 97, (1, 10), generator=g), torch.randint(1, 97, (1, 16), generator=g)
    reference = ns.collect_covariances(model, [short, long])  # two unpadded batches of one
    pad = torch.zeros(1, 6, dtype=torch.long)
    pieces = [short, pad] if side == "right" else [pad, short]
    idx = torch.cat([torch.cat(pieces, dim=1), long])  # (2, 16)
    keep = idx != 0  # pad id 0 never appears in the real tokens above
    collector = cal.CovarianceCollector(model)
    collector.add_batch(idx, keep)
    padded = collector.finalize()
    assert all(int(count) == 26 for count in collector.counts.values())
    for name in reference:
        torch.testing.assert_close(padded[name], reference[name], rtol=1e-5, atol=1e-6)


class CountingCollector(cal.CovarianceCollector):
    """Counts how often each hooked layer's input is accumulated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = Counter()

    def _accumulate(self, name, x, keep):
        self.calls[name] += 1
        super()._accumulate(name, x, keep)


def test_shared_inputs_are_collected_once():
    model = random_model()
    n_layers = len(model.layers)
    hooks_during_forward = []
    model.register_forward_pre_hook(
        lambda module, args: hooks_during_forward.append(sum(len(m._forward_hooks) for m in model.modules())))
    collector = CountingCollector(model)
    batches = calibration_batches()
    for idx, keep in batches:
        collector.add_batch(idx, keep)
    covariances = collector.finalize()

    assert hooks_during_forward == [4 * n_layers] * len(batches)  # 4 hooks per block, not 7
    assert len(collector.sums) == 4 * n_layers
    assert set(collector.calls.values()) == {len(batches)}  # one accumulation per input per forward
    assert all(int(count) == 3 * 40 + 2 * 25 for count in collector.counts.values())  # not 3x
    for i in range(n_layers):
        q, k, v = (covariances[f"layers.{i}.attention.w{p}"] for p in "qkv")
        assert q is k and k is v
        assert covariances[f"layers.{i}.feed_forward.w_gate"] is covariances[f"layers.{i}.feed_forward.w_up"]
        assert covariances[f"layers.{i}.attention.wo"] is not q


def test_groups_follow_the_targets():
    groups = cal.input_groups(random_model(), ("v", "up", "down", "v"))
    assert groups == {
        "layers.0.attention.wv": ["layers.0.attention.wv"],
        "layers.0.feed_forward.w_up": ["layers.0.feed_forward.w_up"],
        "layers.0.feed_forward.w_down": ["layers.0.feed_forward.w_down"],
        "layers.1.attention.wv": ["layers.1.attention.wv"],
        "layers.1.feed_forward.w_up": ["layers.1.feed_forward.w_up"],
        "layers.1.feed_forward.w_down": ["layers.1.feed_forward.w_down"],
    }
    with pytest.raises(ValueError, match="unknown LoRA target"):
        cal.input_groups(random_model(), ("q", "wq"))


def test_hooks_are_removed_after_an_error_and_nonfinite_inputs_are_named():
    model = random_model().train()
    with torch.no_grad():
        model.layers[1].ffn_norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf .* entering layers\.1\.feed_forward\.w_gate"):
        ns.collect_covariances(model, calibration_batches())
    assert has_no_hooks(model)
    assert model.training  # the training flag is restored


class ZeroAdapter(nn.Module):
    """A stand-in for a LoRA wrapper: base linear plus an adapter that starts at zero."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


def test_hooks_read_the_same_input_through_a_wrapped_linear():
    model = random_model()
    batches = calibration_batches()
    plain = ns.collect_covariances(model, batches)
    model.layers[0].attention.wq = ZeroAdapter(model.layers[0].attention.wq)
    model.layers[1].feed_forward.w_down = ZeroAdapter(model.layers[1].feed_forward.w_down)
    wrapped = ns.collect_covariances(model, batches)
    for name in plain:
        torch.testing.assert_close(wrapped[name], plain[name], rtol=0, atol=0)


def test_too_few_tokens_warns_with_layer_and_counts():
    model = random_model()
    idx = torch.randint(1, 97, (1, 8))
    with pytest.warns(UserWarning, match=r"layers\.\d\.feed_forward\.w_down: only N=8 .* n=128") as caught:
        ns.collect_covariances(model, [idx], targets=("down",))
    assert [str(w.message).split(":")[0] for w in caught] == [
        "layers.0.feed_forward.w_down", "layers.1.feed_forward.w_down"]
    with pytest.raises(ValueError, match="no calibration tokens"):
        ns.collect_covariances(model, [])


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
def test_per_sample_max_norm_divides_each_sequence_by_its_signed_max():
    model = random_model()
    idx = torch.randint(1, 97, (2, 12))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 9:] = False
    covariances = cal.calibrate(model, [(idx, keep)], per_sample_max_norm=True, targets=("o",))
    # Record the inputs of wo per sequence and normalise them by hand.
    X = record_linear_inputs(model, [(idx, keep)])["layers.1.attention.wo"]  # (9 + 12, n)
    first, second = X[:9], X[9:]
    scaled = torch.cat([first / first.max().abs(), second / second.max().abs()])
    C = covariances["layers.1.attention.wo"]
    # the collector divides in float32, so compare at float32 precision
    torch.testing.assert_close(C, gram(scaled), rtol=0, atol=1e-6 * float(C.abs().max()))
    unscaled = ns.collect_covariances(model, [(idx, keep)], targets=("o",))["layers.1.attention.wo"]
    assert not torch.allclose(C, unscaled, rtol=1e-2)


def test_null_init_on_collected_covariance_keeps_model_output():
    model = random_model(std=0.2)
    idx = torch.randint(1, 97, (1, 20))  # 20 tokens < n - r: an exact null space
    with pytest.warns(UserWarning, match="rank-deficient"):
        covariances = ns.collect_covariances(model, [idx], targets=("q", "gate"))
    X = record_linear_inputs(model, [(idx, None)])["layers.1.feed_forward.w_gate"].float()
    with torch.no_grad():
        logits_before, _ = model(idx)
        linear = model.layers[1].feed_forward.w_gate
        A, B, W_res = ns.loranull_init(linear.weight, covariances["layers.1.feed_forward.w_gate"], 8, 16.0)
        assert (X @ A.T).norm() / (X.norm() * A.norm()) < 1e-5  # A x ~ 0 on the calibration text
        adapter = ZeroAdapter(linear, r=8)
        adapter.base.weight.copy_(W_res)
        adapter.A.copy_(A)
        adapter.B.copy_(2.0 * B)  # s = alpha / r = 2 folded into B
        model.layers[1].feed_forward.w_gate = adapter
        logits_after, _ = model(idx)
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["null", "space", "pissa", "milora", "corda", "top"])
def test_init_adapters_gives_the_same_bits_on_one_and_two_threads(init):
    """On 2 threads the layers run side by side, each in one thread: every factor and residual
    must be the bits of the 1-thread run (LAPACK rounds differently on 2 threads)."""
    import lora

    def started(threads):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(n, m) for n, m in [(256, 384), (384, 256), (256, 256), (256, 384)]])
        layers = {str(i): lora.wrap_linear(model, str(i), 8, 16.0, 0.0, False) for i in range(len(model))}
        X = {str(i): torch.randn(600, layer.base.in_features, dtype=torch.float64) @ torch.randn(
            layer.base.in_features, layer.base.in_features, dtype=torch.float64) for i, layer in layers.items()}
        covariances = {name: x.T @ x / len(x) for name, x in X.items()}
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ns.init_adapters(layers, init, covariances)
        finally:
            torch.set_num_threads(before)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one, two = started(1), started(2)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
