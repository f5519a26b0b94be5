"""The null space of the activations: covariances, LoRA-Null, CorDA, the init table, diagnostics.

LoRA-Null (Tang et al. 2025) starts the adapter of every linear layer y = x @ W.T in the
directions its inputs never use. Read top to bottom:
1. calibration: a forward hook collects each layer's input covariance C = X.T @ X / N
   (uncentred), X (N, n) being all calibration tokens stacked;
2. the null basis: the eigenvectors of C with the r smallest eigenvalues, the directions
   u with X @ u ~ 0;
3. LoRA-Null: the adapter takes W_null = W @ U @ U.T, so A @ x ~ 0 on knowledge-like x, and
   training B with A frozen ("v2") cannot disturb those inputs;
4. CorDA (Yang et al. 2024), knowledge-preserved mode: the smallest components of W @ C;
5. the controls for LoRA-Null's three ingredients (A frozen, where A points, weight moved
   into the adapter) and the one table of inits, each (W, C, r, alpha) -> (A, B, W_res);
6. diagnostics: effective rank, the calibration energy A reads, the knowledge disturbance.
Conventions as in lora.py: W (m, n); the adapter adds s * (x @ A.T) @ B.T, A (r, n),
B (m, r), s = alpha / r; W_res + s * B @ A == W. Block-by-block calibration for large
models is in loranull_mini/calibration.py (tested equal to the hook here).
"""
import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

import lora
from model import PROJECTIONS

# -----------------------------------------------------------------------------
# 1. Calibration: the covariance of each layer's input

ALL_TARGETS = tuple(PROJECTIONS)  # ("q", "k", "v", "o", "gate", "up", "down")


@torch.no_grad()
def collect_covariances(model: nn.Module, batches, targets=ALL_TARGETS) -> dict[str, Tensor]:
    """{layer name: C = X.T @ X / N (n, n) float64} over the real tokens of `batches`.

    batches: `idx` (B, T) tensors or `(idx, pad_mask)` pairs, pad_mask True at real tokens.
    """
    lora.check_targets(targets)
    names = [f"layers.{i}.{PROJECTIONS[t]}" for i in range(len(model.layers)) for t in dict.fromkeys(targets)]
    sums, counts, keep = {}, {}, None

    def hook(name):
        def record(module, args, output):
            # exercise 5: the covariance hook
            x = args[0].detach().flatten(0, -2)                     # (B*T, n)
            if keep is not None:
                x = x[keep.flatten()]                               # padding never enters C
            x = x.double()
            sums[name] = sums.get(name, 0) + x.T @ x                # (n, n)
            counts[name] = counts.get(name, 0) + len(x)
            # end exercise 5
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in batches:
            idx, keep = batch if isinstance(batch, (tuple, list)) else (batch, None)
            keep = None if keep is None else keep.to(device, torch.bool)
            model(idx.to(device), pad_mask=keep)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: covariance(sums.get(name), counts.get(name, 0), name) for name in names}


def covariance(S: Tensor, N: int, name: str) -> Tensor:
    """C = (S + S.T) / (2 N) from the sum S of x x^T over N tokens: exactly symmetric."""
    # exercise 5: the covariance hook
    if not N:
        raise ValueError(f"no calibration tokens reached {name}")
    if not torch.isfinite(S.diagonal()).all():  # the diagonal sums x_i^2: NaN/Inf anywhere shows here
        raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
    if N < S.shape[0]:
        warnings.warn(f"{name}: only N={N} calibration tokens for n={S.shape[0]} input features; the covariance "
                      f"is rank-deficient, so the null basis is an arbitrary choice among {S.shape[0] - N} or "
                      f"more zero eigenvalues", stacklevel=3)
    return (S + S.T) / (2 * N)
    # end exercise 5


# -----------------------------------------------------------------------------
# 2. The null basis and 3. LoRA-Null

def null_basis(C: Tensor, r: int) -> Tensor:
    """U (n, r) float64: the eigenvectors of C with the r smallest eigenvalues.

    C is PSD, so these are the right singular vectors of X with the r smallest singular
    values: orthonormal directions u along which the calibration inputs are (nearly) zero.
    eigh returns the eigenvalues in ascending order.
    """
    # exercise 6: the null basis and LoRA-Null
    check_covariance(C, r)
    _, Q = torch.linalg.eigh(C.to(torch.float64))  # (n, n), columns by ascending eigenvalue
    return Q[:, :r]
    # end exercise 6


def loranull_init(W: Tensor, C: Tensor, r: int, alpha: float, *, U_null: Tensor | None = None, generator=None):
    """LoRA-Null (Tang et al. 2025, method section): the adapter holds W's null-space part.

        U = null_basis(C, r)                       (n, r)
        W_null = W @ U @ U.T = U' diag(S') (U Q').T     from the SVD of the small (m, r) W @ U
        A = diag(sqrt(S'/s)) (U Q').T,  B = U' diag(sqrt(S'/s)),  W_res = W - s B A = W - W_null
    The reference code takes the SVD of the (m, n) matrix W_null; W @ U = U' diag(S') Q'.T
    gives the same factors for O(m r^2). Every row of A lies in span(U), so A @ x ~ 0 for
    knowledge-like x. U_null: the basis when already known (layers sharing C share it).
    """
    # exercise 6: the null basis and LoRA-Null
    check_init_inputs(W, C, r, alpha)
    s = alpha / r
    W64 = W.detach().double()
    U = null_basis(C.to(W.device), r) if U_null is None else U_null.to(W.device, torch.float64)
    U_w, S, Qh = torch.linalg.svd(W64 @ U, full_matrices=False)  # (m, r), (r,), (r, r)
    root = torch.sqrt(S / s)
    A = (root[:, None] * (Qh @ U.T)).to(lora.factor_dtype(W))  # (r, n)
    B = (U_w * root[None, :]).to(lora.factor_dtype(W))  # (m, r)
    return A, B, lora.residual_weight(W, A, B, s)  # W_res = W - s B A = W - W_null
    # end exercise 6


# -----------------------------------------------------------------------------
# 4. CorDA, knowledge-preserved mode (LoRA-Null's code is a fork of CorDA's)

def corda_init(W: Tensor, C: Tensor, r: int, alpha: float, *, generator=None):
    """CorDA-KPA (Yang et al. 2024): the r smallest components of W @ C.

        C' = damped C;   W @ C' = U diag(S) V.T (thin SVD);   V' = inv(C') V, so W = U diag(S) V'.T
        the r SMALLEST triplets: A = diag(sqrt(S_r/s)) V'_r.T, B = U_r diag(sqrt(S_r/s)), W_res = W - s B A
    CorDA uses s = 1; dividing S_r by s (as PEFT does) makes s B A the same for any alpha.
    """
    check_init_inputs(W, C, r, alpha)
    s = alpha / r
    W64 = W.detach().double()
    C_damped, _ = damped_covariance(C.to(W.device))
    U, S, Vh = torch.linalg.svd(W64 @ C_damped, full_matrices=False)  # S descending
    V_prime = torch.linalg.solve(C_damped, Vh.T)  # (n, k) = inv(C') V
    root = torch.sqrt(S[-r:] / s)
    A = (root[:, None] * V_prime[:, -r:].T).to(lora.factor_dtype(W))  # (r, n)
    B = (U[:, -r:] * root[None, :]).to(lora.factor_dtype(W))  # (m, r)
    return A, B, lora.residual_weight(W, A, B, s)


def damped_covariance(C: Tensor, *, damp: float = 0.01, tol: float = 0.05, max_doublings: int = 60):
    """(C', d), C' = C + d * mean(diag C) * I for the first d = damp * 2^k with
    ||C' inv(C') - I||_F < tol in float32, the reference's test (in float64 it would pass
    at once). C' is float64."""
    C = C.double()
    scale = C.diagonal().mean()
    if not scale > 0:
        raise ValueError("covariance has a zero (or negative) mean diagonal: no calibration energy")
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for _ in range(max_doublings):
        C_damped = C + damp * scale * eye
        C32 = C_damped.float()
        if torch.dist(C32 @ torch.linalg.inv(C32), eye.float()) < tol:
            return C_damped, damp
        damp *= 2
    raise ValueError(f"damping did not make the covariance invertible to tol={tol}")


# -----------------------------------------------------------------------------
# 5. Controls (B = 0, W_res = W, A frozen by the caller) and the table of every init

def top_space_init(W: Tensor, C: Tensor, r: int, alpha: float, *, generator=None):
    """A control: A in the r MOST used input directions, A = U_top.T / sqrt(3), B = 0, W_res = W."""
    check_init_inputs(W, C, r, alpha)
    U_top = torch.linalg.eigh(C.to(W.device).double())[1][:, -r:]  # (n, r)
    return frozen_direction_factors(W, U_top)


def space_only_init(W: Tensor, C: Tensor, r: int, alpha: float, *, U_null: Tensor | None = None, generator=None):
    """LoRA-Null's space without its residual: A = U_null.T / sqrt(3), B = 0, W_res = W.
    U_null: the basis when already known (layers sharing C share it)."""
    check_init_inputs(W, C, r, alpha)
    U = null_basis(C.to(W.device), r) if U_null is None else U_null.to(W.device, torch.float64)
    return frozen_direction_factors(W, U)


def frozen_direction_factors(W: Tensor, U: Tensor):
    """A = U.T / sqrt(3) (rows of norm 1/sqrt(3), the expected row norm of vanilla's A,
    uniform in +-1/sqrt(n)), B = 0, W_res = W."""
    dtype = lora.factor_dtype(W)
    return (U.T / math.sqrt(3)).to(dtype), torch.zeros(W.shape[0], U.shape[1], device=W.device, dtype=dtype), W.clone()


INITS = {  # name -> init(W, C, r, alpha, *, generator) -> (A, B, W_res)
    "vanilla": lambda W, C, r, alpha, generator=None: lora.vanilla_init(W, r, alpha, generator=generator),
    "pissa": lambda W, C, r, alpha, generator=None: lora.pissa_init(W, r, alpha),
    "milora": lambda W, C, r, alpha, generator=None: lora.milora_init(W, r, alpha),
    "corda": corda_init,
    "null": loranull_init,
    "top": top_space_init,
    "space": space_only_init,
}
NEEDS_COVARIANCE = {"corda", "null", "top", "space"}
TAKES_NULL_BASIS = {"null", "space"}  # these also take U_null=, one basis per distinct covariance


def check_init(init: str):
    """The one check of an init's name."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid inits: {list(INITS)}")


def init_adapters(layers: dict, init: str, covariances: dict | None = None, *, generator=None, basis=null_basis):
    """Restart every LoRALinear of `layers` from INITS[init]: the one place that dispatches.

    covariances: {layer name: C} for the inits that read the inputs. generator: vanilla's A is
    drawn layer after layer from it. basis(C, r) -> U_null: the null basis of "null" and
    "space", computed once per distinct covariance (q/k/v share one, gate/up another);
    null_basis's eigh by default (loranull_mini/fastbasis for wide models). On the CPU the
    layers run side by side, each in one thread: the same bits on any thread count (one_thread).
    """
    check_init(init)
    missing = [n for n in layers if init in NEEDS_COVARIANCE and (covariances is None or n not in covariances)]
    if missing:
        raise ValueError(f"init {init!r} needs the input covariance of every target layer; missing for "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}; compute them with "
                         f"nullspace.collect_covariances(model, batches, targets)")
    on_cpu = all(layer.base.weight.device.type == "cpu" for layer in layers.values())
    workers = torch.get_num_threads() if on_cpu and init != "vanilla" else 1  # vanilla: one generator, in order
    bases, first = {}, {}  # (id(C), r) -> U_null, one per distinct covariance; -> the first layer with it

    def named(name, f, *args):  # f(*args), its error naming the layer
        try:
            return f(*args)
        except ValueError as e:
            raise ValueError(f"{init} init of {name}: {e}") from None

    def start(name, layer):
        W, C = layer.base.weight.detach(), covariances[name] if init in NEEDS_COVARIANCE else None
        shared = {"U_null": bases[(id(C), layer.r)]} if init in TAKES_NULL_BASIS else {}
        A, B, W_res = INITS[init](W, C, layer.r, layer.alpha, generator=generator, **shared)
        layer.initialize(A, B, W_res)
    # each layer (and each basis) in one thread, `workers` of them side by side (see one_thread)
    with one_thread(), ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        run = pool.map if workers > 1 else map  # one worker: in this thread (CUDA keeps its device)
        for name, layer in layers.items() if init in TAKES_NULL_BASIS else ():
            first.setdefault((id(covariances[name]), layer.r), name)
        bases.update(zip(first, run(lambda n: named(n, basis, covariances[n].to(layers[n].base.weight.device),
                                                      layers[n].r), first.values())))
        list(run(lambda item: named(item[0], start, *item), layers.items()))


@contextlib.contextmanager
def one_thread():
    """Run the block in one thread. LAPACK's eigh and SVD round differently with 1 and 2 threads;
    training amplifies the last-bit differences (toy, A trained: KL 2.766 vs 2.790), so each
    layer's init runs in one thread (as many layers side by side as there were threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inject_adapters(model: nn.Module, targets=ALL_TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    init: str = "vanilla", covariances: dict | None = None, freeze_A: bool = False, seed: int = 0,
                    basis=null_basis):
    """Wrap every target projection (lora.wrap_linear) and start it from `init` (init_adapters),
    vanilla's A drawn from one generator seeded with `seed`: {module name: LoRALinear}."""
    check_init(init)
    layers = {name: lora.wrap_linear(model, name, r, alpha, dropout, freeze_A)
              for name in lora.target_module_names(model, targets)}
    init_adapters(layers, init, covariances, generator=torch.Generator().manual_seed(seed), basis=basis)
    lora.mark_only_lora_trainable(model)
    return layers


def check_covariance(C: Tensor, r: int):
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(C.shape)}")
    if not 1 <= r <= C.shape[0]:
        raise ValueError(f"rank r={r} must satisfy 1 <= r <= n = {C.shape[0]}")
    if not torch.isfinite(C).all():
        raise ValueError("covariance contains NaN/Inf")


def check_init_inputs(W: Tensor, C: Tensor, r: int, alpha: float):
    """Clear errors for the inputs of the covariance-based inits."""
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix (out, in), got shape {tuple(W.shape)}")
    if tuple(C.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"covariance shape {tuple(C.shape)} does not match W {W.shape[0]}x{W.shape[1]}: "
                         f"expected ({W.shape[1]}, {W.shape[1]}) for the layer's input dimension")
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"rank r={r} must satisfy 1 <= r <= min(m, n) = {min(W.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN/Inf")
    check_covariance(C, r)


# -----------------------------------------------------------------------------
# 6. Diagnostics

def effective_rank(singular_values: Tensor) -> dict:
    """Entropy effective rank (Roy & Vetterli 2007) exp(-sum p_i log p_i), p = sigma / sum(sigma),
    and n90 / n99, the fewest components holding 90% / 99% of the energy sum(sigma^2)."""
    sv = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if sv.numel() == 0 or not torch.isfinite(sv).all() or (sv < 0).any():
        raise ValueError("singular values must be a non-empty set of finite values >= 0")
    if sv.sum() == 0:
        raise ValueError("all singular values are zero: the effective rank is undefined")
    p = sv[sv > 0] / sv.sum()  # 0 log 0 = 0
    share = torch.sort(sv ** 2, descending=True).values.cumsum(0) / (sv ** 2).sum()
    count = lambda q: min(int((share < q - 1e-12).sum()) + 1, sv.numel())  # noqa: E731
    return {"erank": math.exp(float(-(p * p.log()).sum())), "n90": count(0.90), "n99": count(0.99)}


def activation_singular_values(C: Tensor) -> Tensor:
    """Singular values of X / sqrt(N), descending: sqrt of C's eigenvalues (rounding's tiny
    negative ones clamped to 0). The 1 / sqrt(N) does not change effective_rank."""
    return torch.linalg.eigvalsh(C.double()).clamp_min(0).sqrt().flip(0)


def weight_singular_values(W: Tensor) -> Tensor:
    return torch.linalg.svdvals(W.detach().double())


def captured_energy(A: Tensor, C: Tensor) -> float:
    """trace(P_A C) / trace(C): the share of calibration energy in A's row space.

    P_A projects onto the row space of A (r, n), from the right singular vectors whose
    singular values are not negligible (a rank-deficient A projects onto its true row
    space). By Ky Fan's theorem k dimensions capture at least the sum of C's k smallest
    eigenvalues: LoRA-Null attains that minimum.
    """
    if A.ndim != 2 or tuple(C.shape) != (A.shape[1], A.shape[1]):
        raise ValueError(f"A {tuple(A.shape)} and C {tuple(C.shape)}: expected A (r, n), C (n, n)")
    C64 = C.double()
    _, S, Vh = torch.linalg.svd(A.detach().double(), full_matrices=False)
    basis = Vh[S > S.max() * max(A.shape) * torch.finfo(A.dtype).eps]  # (rank, n)
    return float(torch.trace(basis @ C64 @ basis.T) / torch.trace(C64))


def output_energy(W: Tensor, C: Tensor) -> float:
    """trace(W C W^T) = ||W X^T||_F^2 / N: how much the layer's output carries on calibration inputs."""
    W64 = W.detach().double()
    return float(((W64 @ C.double()) * W64).sum())


def knowledge_disturbance(F: Tensor, G: Tensor, C: Tensor, energy: float) -> float:
    """||dW X^T||_F / ||W X^T||_F over the calibration inputs, for dW = F @ G of rank k.

    ||dW X^T||^2 / N = trace(dW C dW^T) = trace((F^T F)(G C G^T)): O(k n^2), no (m, n) product.
    energy = output_energy(W, C) of the original weight. For LoRA-Null v2, dW = s dB @ A and
    A X^T ~ 0, so this stays ~0.
    """
    if F.shape[1] != G.shape[0] or tuple(C.shape) != (G.shape[1], G.shape[1]):
        raise ValueError(f"shapes F {tuple(F.shape)}, G {tuple(G.shape)}, C {tuple(C.shape)} do not match: "
                         f"expected F (m, k), G (k, n), C (n, n)")
    if not energy > 0:
        raise ValueError("W maps the calibration inputs to zero: the ratio is undefined")
    F64, G64 = F.detach().double(), G.detach().double()
    update = ((F64.T @ F64) * (G64 @ C.double() @ G64.T)).sum()
    return math.sqrt(max(float(update), 0.0) / energy)
