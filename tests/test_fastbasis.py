"""loranull_mini/fastbasis.py: the r smallest eigenvectors of a covariance without a full eigh.

Every result is checked against float64 eigh, with the acceptance test written out here
(not taken from the module): the captured energy trace(U^T C U) may exceed the minimum, the
sum of the r smallest eigenvalues, by 1% of it plus a floor of r * eps * trace(C).
"""
import functools

import pytest
import torch

from loranull_mini import fastbasis as fb

F64 = torch.float64
EPS = torch.finfo(F64).eps


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: threads only add synchronisation, which a busy machine makes slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q


def from_spectrum(eigenvalues, seed=0):
    """C = Q diag(eigenvalues) Q^T with a random orthogonal Q, exactly symmetric."""
    Q = orthogonal(len(eigenvalues), seed)
    C = (Q * eigenvalues) @ Q.T
    return (C + C.T) / 2


def gram(N, n, seed, column_scales=None):
    """X^T X / N for X (N, n) Gaussian (columns scaled): rank min(N, n), exact zeros if N < n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=F64)
    if column_scales is not None:
        X = X * column_scales
    C = X.T @ X / N
    return (C + C.T) / 2


def assert_energy_within_bound(U, C):
    r = U.shape[1]
    energy = float(torch.trace(U.T @ C @ U))
    minimum = float(torch.linalg.eigvalsh(C)[:r].sum())
    floor = r * EPS * float(torch.trace(C))
    assert energy - minimum <= 0.01 * minimum + floor, (energy, minimum, floor)


n = 480
SPECTRA = {
    # 60 nearly equal smallest eigenvalues (spread 6e-5), far more than the block holds
    "cluster": lambda: from_spectrum(torch.cat([1e-4 * (1 + 1e-6 * torch.arange(60, dtype=F64)),
                                                torch.logspace(-2, 0, n - 60, dtype=F64)]), 1),
    # 5 tiny eigenvalues, then 100 within 10% of each other: r = 8 must pick the right 3 of them
    "cluster_straddling_r": lambda: from_spectrum(torch.cat([torch.full((5,), 1e-6, dtype=F64),
                                                             1e-4 * (1 + 1e-3 * torch.arange(100, dtype=F64)),
                                                             torch.logspace(-2, 0, n - 105, dtype=F64)]), 2),
    # a flat spectrum: every eigenvalue within 5% of every other
    "flat": lambda: from_spectrum(torch.sort(1e-4 * (1 + 0.05 * torch.rand(
        n, generator=torch.Generator().manual_seed(3), dtype=F64))).values, 3),
    # N < n tokens: n - N exact zero eigenvalues, any basis inside them is exact
    "rank_deficient": lambda: gram(50, n, 4, torch.logspace(0, -3, n, dtype=F64)),
    # N = n - 5: 5 exact zeros, so r = 8 also needs the 3 smallest positive eigenvalues
    "rank_deficient_by_5": lambda: gram(n - 5, n, 5),
    # eigenvalues over 12 decades, and a Gram matrix whose spectrum spans ~12 decades
    "12_decades": lambda: from_spectrum(torch.logspace(0, -12, n, dtype=F64), 6),
    "12_decades_gram": lambda: gram(400, n, 7, torch.logspace(0, -6, n, dtype=F64)),
    # one huge outlier direction (as in LLM activations) above 3 decades of tiny ones
    "outlier": lambda: from_spectrum(torch.cat([torch.logspace(-9, -6, n - 1, dtype=F64),
                                                torch.tensor([1e3], dtype=F64)]), 8),
}


@functools.lru_cache(maxsize=None)
def spectrum(name):
    """SPECTRA[name](), built once per session (the solver never writes to C)."""
    return SPECTRA[name]()


def separated(r=8, n=240, seed=0):
    """r distinct small eigenvalues in [1e-3, 2e-3], then a gap of 500x to the rest."""
    return from_spectrum(torch.cat([torch.linspace(1e-3, 2e-3, r, dtype=F64),
                                    torch.logspace(0, 1, n - r, dtype=F64)]), seed)


def test_projector_matches_eigh_on_a_separated_spectrum():
    C = separated()
    U, info = fb.smallest_eigenvectors(C, 8, return_info=True)
    assert info["used"] == "krylov" and info["converged"] and info["fallback"] is None
    Q = torch.linalg.eigh(C).eigenvectors[:, :8]
    assert (U @ U.T - Q @ Q.T).abs().max() < 1e-8
    # sorted by ascending Ritz value, each close to its eigenvalue
    theta = ((C @ U) * U).sum(0)
    assert torch.all(theta[1:] >= theta[:-1])
    assert torch.allclose(theta, torch.linalg.eigvalsh(C)[:8], rtol=1e-9, atol=0)


@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_captured_energy_within_one_percent_of_the_minimum(name, r):
    C = spectrum(name)
    U, info = fb.smallest_eigenvectors(C, r, return_info=True)
    assert info["fallback"] is None  # the iterative solver did it, not the exact eigh
    assert U.shape == (n, r) and U.dtype == F64
    assert_energy_within_bound(U, C)


def test_energy_gap_flags_a_bad_basis_and_passes_the_exact_one():
    C = spectrum("12_decades")
    Q = torch.linalg.eigh(C).eigenvectors
    assert fb.energy_gap(Q[:, :8], C)["ok"]
    bad = fb.energy_gap(Q[:, 1:9], C)  # skips the smallest eigenvector
    assert not bad["ok"] and bad["relative"] > 0.01


# Exactly low-dimensional invariant subspaces: A^k V falls inside the earlier Krylov blocks,
# and Gram-Schmidt is left with rounding noise (or nothing) to normalise.
INVARIANT = {
    "4_exact_zeros": lambda: from_spectrum(torch.cat([torch.zeros(4, dtype=F64), torch.ones(n - 4, dtype=F64)]), 1),
    "two_eigenvalues": lambda: from_spectrum(torch.cat([torch.full((8,), 1e-8, dtype=F64),
                                                        torch.ones(n - 8, dtype=F64)]), 2),
    "identity": lambda: torch.eye(n, dtype=F64),
}


@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("name", ["rank_deficient", "12_decades", *INVARIANT])
def test_columns_are_orthonormal(name, r):
    C = INVARIANT[name]() if name in INVARIANT else spectrum(name)
    U, info = fb.smallest_eigenvectors(C, r, return_info=True)
    assert info["fallback"] is None
    assert (U.T @ U - torch.eye(r, dtype=F64)).abs().max() < 1e-10
    assert_energy_within_bound(U, C)


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "NaN/Inf"),
    (float("inf"), "NaN/Inf"),
])
def test_refuses_non_finite_input(bad, message):
    C = separated(n=40)
    C[3, 5] = bad
    with pytest.raises(ValueError, match=message):
        fb.smallest_eigenvectors(C, 4)


def test_refuses_a_non_symmetric_matrix_but_accepts_rounding_asymmetry():
    C = separated(n=40)
    skew = torch.randn(40, 40, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(ValueError, match="not symmetric"):
        fb.smallest_eigenvectors(C + 1e-3 * (skew - skew.T), 4)
    with pytest.raises(ValueError, match="not symmetric"):
        fb.smallest_eigenvectors(torch.triu(C), 4)
    # asymmetry at rounding level is accepted, and the symmetric part is what is solved
    nudged = C + 1e-14 * (skew - skew.T)
    U = fb.smallest_eigenvectors(nudged, 4)
    assert_energy_within_bound(U, C)


@pytest.mark.parametrize("r", [0, -1, 41, 2.5, True])
def test_refuses_bad_r(r):
    with pytest.raises(ValueError, match="rank r"):
        fb.smallest_eigenvectors(separated(r=4, n=40), r)


def test_refuses_bad_shapes_dtypes_and_methods():
    C = separated(r=4, n=40)
    with pytest.raises(ValueError, match="square"):
        fb.smallest_eigenvectors(C[:, :30], 4)
    with pytest.raises(ValueError, match="square"):
        fb.smallest_eigenvectors(C[None], 4)
    with pytest.raises(ValueError, match="floating"):
        fb.smallest_eigenvectors(C.round().long(), 4)
    with pytest.raises(ValueError, match="method"):
        fb.smallest_eigenvectors(C, 4, method="lanczos")


def exact_basis(C, r):
    return torch.linalg.eigh(C.to(F64)).eigenvectors[:, :r]


def test_fallback_after_max_cycles_gives_the_exact_eigh_answer():
    C = spectrum("flat")
    U, info = fb.smallest_eigenvectors(C, 8, max_cycles=0, return_info=True)
    assert info["used"] == "eigh" and not info["converged"]
    assert info["fallback"].startswith("not converged after 0 cycles")
    assert torch.equal(U, exact_basis(C, 8))
    # a hard spectrum and an unreachable tolerance: one cycle, then the exact answer
    U, info = fb.smallest_eigenvectors(C, 8, max_cycles=1, tol=1e-14, return_info=True)
    assert info["cycles"] == 1 and info["fallback"].startswith("not converged after 1 cycles")
    assert torch.equal(U, exact_basis(C, 8))


def test_fallback_when_cholesky_fails_on_an_indefinite_matrix():
    eigenvalues = torch.cat([torch.tensor([-1.0, -0.5], dtype=F64), torch.logspace(-3, 0, 198, dtype=F64)])
    C = from_spectrum(eigenvalues, 2)
    U, info = fb.smallest_eigenvectors(C, 4, return_info=True)
    assert info["used"] == "eigh" and info["fallback"].startswith("Cholesky failed")
    assert torch.equal(U, exact_basis(C, 4))


def test_exact_eigh_when_the_krylov_space_would_not_fit():
    C = separated(r=4, n=40)
    U, info = fb.smallest_eigenvectors(C, 8, return_info=True)  # 5 blocks of 12 > 40 / 4
    assert info["used"] == "eigh" and info["fallback"].startswith("block too large")
    assert torch.equal(U, exact_basis(C, 8))


def test_deterministic_and_seeded():
    C = spectrum("12_decades_gram")
    U1 = fb.smallest_eigenvectors(C, 8)
    torch.randn(10)  # the global generator plays no part
    U2 = fb.smallest_eigenvectors(C, 8)
    assert torch.equal(U1, U2)
    U3 = fb.smallest_eigenvectors(C, 8, seed=1)
    assert not torch.equal(U1, U3)  # another start block: another (equally good) basis
    assert_energy_within_bound(U3, C)


@pytest.mark.parametrize("method", ["subspace", "eigh32", "eigh"])
def test_other_methods(method):
    C = spectrum("12_decades")
    U, info = fb.smallest_eigenvectors(C, 8, method=method, max_cycles=40, return_info=True)
    assert info["used"] == method and (info["fallback"] is None or method == "eigh")
    assert (U.T @ U - torch.eye(8, dtype=F64)).abs().max() < 1e-10
    assert_energy_within_bound(U, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_float_dtype_in_float64_out(dtype):
    C = separated().to(dtype)
    U = fb.smallest_eigenvectors(C, 8)
    assert U.dtype == F64 and U.device == C.device
    assert_energy_within_bound(U, C.to(F64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    C = separated()
    U, info = fb.smallest_eigenvectors(C.cuda(), 8, return_info=True)
    assert U.is_cuda and U.dtype == F64 and info["used"] == "krylov" and info["fallback"] is None
    Q = exact_basis(C, 8)
    assert (U.cpu() @ U.cpu().T - Q @ Q.T).abs().max() < 1e-8
    C = spectrum("12_decades_gram")
    U = fb.smallest_eigenvectors(C.cuda().float(), 8)
    assert_energy_within_bound(U.cpu(), C.float().to(F64))


def test_a_singular_covariance_from_float32_products_takes_the_fast_path():
    """Fewer tokens than features, products in float32 (as train.py forms them): C's zero
    eigenvalues come out at float32 rounding level, some negative, so the Cholesky factor needs
    a shift far above float64's; the solver finds it instead of falling back to eigh, and its
    basis captures no more energy than rounding (every basis of the zero space is as good)."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(512, 1536, generator=g) * torch.logspace(0, -1, 1536) + 3 * torch.randn(1, 1536, generator=g))
    C = (X.T @ X).double() / 512
    U, info = fb.smallest_eigenvectors(C, 8, return_info=True)
    assert info["used"] == "krylov" and info["fallback"] is None
    trace = float(torch.trace(C))
    minimum = float(torch.linalg.eigvalsh(C)[:8].sum())
    assert float(torch.trace(U.T @ C @ U)) - minimum <= 1e-7 * trace
