"""The null space of the activations: calibration covariances, LoRA-Null, CorDA, diagnostics.

LoRA-Null (Tang et al. 2025, "Put the Space of LoRA Initialization to the Extreme to
Preserve Pre-trained Knowledge") starts the adapter of every linear layer y = x @ W.T in
the directions that the layer's inputs never use. Read this file top to bottom:

1. Calibration. Run the model on text that stands for pre-trained knowledge, and collect
   for each adapted layer the covariance (uncentred Gram matrix) of its input,
   C = X.T @ X / N, with X (N, n) all calibration tokens stacked.
2. The null basis. The eigenvectors of C with the r smallest eigenvalues span the
   directions where X @ u ~ 0: the (approximate) null space of the activations.
3. LoRA-Null. Project W onto that null basis, W_null = W @ U_null @ U_null.T, and factor it
   into the adapter: B @ A = W_null / s, W_res = W - W_null. At initialisation the output
   is unchanged, and A @ x ~ 0 on knowledge-like inputs x, so training B (with A frozen,
   "v2") cannot disturb them.
4. CorDA (Yang et al. 2024), knowledge-preserved mode: a related baseline that factors
   W @ C instead, and gives the adapter the smallest components.
5. Diagnostics: effective rank of activations and weights, the share of calibration
   energy an adapter's input space captures, and how much a weight update disturbs the
   calibration outputs.

Conventions (as in lora.py): W (m, n) = (out, in); the adapter adds s * (x @ A.T) @ B.T
with A (r, n), B (m, r), s = alpha / r; every init returns (A, B, W_res) with
W_res + s * B @ A == W. Every init is a pure function of tensors; the hooks of step 1 are
the only code here that touches a model.
"""

import contextlib
import math
import warnings

import torch
from torch import Tensor, nn

from model import PROJECTIONS, rotary_cos_sin

# -----------------------------------------------------------------------------
# 1. Calibration covariances

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Which tensor each projection reads inside a LLaMA block. q, k and v all read the output
# of attention_norm, gate and up both read the output of ffn_norm: one covariance serves
# each group, so a block needs 4 covariances, not 7.
SHARED_INPUT = {
    "q": "attention_norm", "k": "attention_norm", "v": "attention_norm",
    "o": "attention_output",
    "gate": "ffn_norm", "up": "ffn_norm",
    "down": "swiglu_output",
}


def input_groups(model: nn.Module, targets=ALL_TARGETS, blocks=None) -> dict[str, list[str]]:
    """{hooked layer: all targeted layers that read the same input}, for every block
    (or only for the block indices in `blocks`).

    Names are module paths such as "layers.3.attention.wq". The first targeted layer of a
    group is the one that gets the hook; e.g. with all seven targets, block 3 gives
    {"layers.3.attention.wq": [...wq, ...wk, ...wv], "layers.3.attention.wo": [...wo],
     "layers.3.feed_forward.w_gate": [...w_gate, ...w_up], ".w_down": [...w_down]}.
    """
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(PROJECTIONS)}")
    targets = list(dict.fromkeys(targets))  # drop repeats, keep the order
    groups = {}
    for i in (range(len(model.layers)) if blocks is None else blocks):
        hooked_name_of_input = {}  # shared input -> the layer that is hooked for it
        for t in targets:
            name = f"layers.{i}.{PROJECTIONS[t]}"
            hooked = hooked_name_of_input.setdefault(SHARED_INPUT[t], name)
            groups.setdefault(hooked, []).append(name)
    return groups


def add_gram_(S: Tensor, x: Tensor, blocks: int = 4) -> Tensor:
    """S += x.T @ x in place, for x (N, n) and S (n, n) (float64 S, any float x), using
    the symmetry of the product.

    The columns of x are cut into `blocks` slices; only the products of slice pairs on and
    below the diagonal are computed, (k + 1) / 2k of the full product's FLOPs for k blocks
    (5/8 for 4), each added into its block of S and, transposed, into the mirror block.
    No (n, n) temporary is made: a fresh large buffer costs page faults at every use.
    """
    n = x.shape[1]
    k = blocks if n >= 64 * blocks else 1  # narrow inputs: one product
    edges = [round(i * n / k) for i in range(k + 1)]
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        for j in range(i + 1):
            c, d = edges[j], edges[j + 1]
            product = (x[:, a:b].T @ x[:, c:d]).to(S.dtype)  # (b - a, d - c), cast once
            S[a:b, c:d] += product
            if i != j:
                S[c:d, a:b] += product.T
    return S


def all_finite(t: Tensor) -> bool:
    """True when t holds no NaN/Inf. A sum is finite only if every term is (an Inf or NaN
    term makes it Inf or NaN), so one cheap reduction settles it; only a sum that
    overflowed needs the element-wise test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def signed_max_per_sequence(x: Tensor, keep: Tensor | None) -> Tensor:
    """The reference code's per-sample scale: |max(x)| over each sequence's real tokens.

    Note: the SIGNED maximum's absolute value (x.max().abs()), not max(|x|), as in the
    LoRA-Null / CorDA reference hooks. Returns (B, 1, 1) for x (B, T, n).
    """
    if keep is not None:
        x = x.masked_fill(~keep[:, :, None], float("-inf"))  # padding never wins the max
    scale = x.amax(dim=(1, 2)).abs()  # (B,)
    return scale.clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]


class CovarianceCollector:
    """Running sums of X.T @ X (float64) and token counts, one per distinct layer input.

    Usage: `c = CovarianceCollector(model); for idx, pad_mask in batches: c.add_batch(idx,
    pad_mask); covariances = c.finalize()`. Under data parallelism, all-reduce (sum)
    every tensor in `c.sums` and `c.counts` across processes before `finalize()`; the
    entries appear at the first `add_batch`, so every process must run at least one batch.

    sums:   {hooked layer: (n, n) float64 sum of x x^T over real tokens}
    counts: {hooked layer: int64 scalar tensor, the number of real tokens N}
    """

    def __init__(self, model: nn.Module, targets=ALL_TARGETS, *, dtype=torch.float64,
                 per_sample_max_norm: bool = False, blocks=None):
        self.model = model
        self.groups = input_groups(model, targets, blocks)  # blocks: hook only these blocks
        self.dtype = dtype  # dtype of the per-batch product X.T @ X; sums are always float64
        self.per_sample_max_norm = per_sample_max_norm
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def _accumulate(self, name: str, x: Tensor, keep: Tensor | None):
        """Add one batch of inputs x (B, T, n) of layer `name`, real tokens only."""
        if self.per_sample_max_norm:
            x = x / signed_max_per_sequence(x, keep)
        x = x.reshape(-1, x.shape[-1])  # (B*T, n)
        if keep is not None:
            x = x[keep.reshape(-1)]  # (N_batch, n): padding never enters C
        x = x.to(self.dtype)
        n = x.shape[1]
        if name not in self.sums:
            self.sums[name] = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            self.counts[name] = torch.zeros((), dtype=torch.int64, device=x.device)
        add_gram_(self.sums[name], x)  # sums += X^T X (n, n)
        # The diagonal holds the sums of squares of x's columns: NaN/Inf anywhere in x shows there.
        if not torch.isfinite(self.sums[name].diagonal()).all():
            raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
        self.counts[name] += x.shape[0]

    @contextlib.contextmanager
    def recording(self, keep: Tensor | None):
        """Inside this context every forward of a hooked layer adds its input to the sums.

        keep (B, T) bool marks the real tokens of the batch that will run (None: all real).
        The hooks only forward the input to _accumulate: nothing is stored on modules, and
        they are removed on leaving, also after an error.
        """
        def make_hook(name):
            return lambda module, args, output: self._accumulate(name, args[0].detach(), keep)

        handles = []
        try:
            for name in self.groups:
                module = self.model.get_submodule(name)  # a plain Linear or a LoRA wrapper
                handles.append(module.register_forward_hook(make_hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_batch(self, idx: Tensor, pad_mask: Tensor | None = None):
        """Run the model once on idx (B, T) and accumulate every hooked layer's input.

        pad_mask (B, T) bool, True = real token (None: all real). The model runs in eval
        mode under no_grad; its training flag is restored afterwards.
        """
        device = next(self.model.parameters()).device
        idx = idx.to(device)
        keep = None if pad_mask is None else pad_mask.to(device=device, dtype=torch.bool)
        if keep is not None and keep.shape != idx.shape:
            raise ValueError(f"pad_mask shape {tuple(keep.shape)} != idx shape {tuple(idx.shape)}")
        was_training = self.model.training
        try:
            self.model.eval()
            with self.recording(keep), torch.no_grad():
                self.model(idx, pad_mask=keep)
        finally:
            self.model.train(was_training)

    def finalize(self) -> dict[str, Tensor]:
        """{layer: C (n, n) float64}; layers sharing an input share one tensor object.

        C = (S + S.T) / (2 N): divide by the token count once, at the end, and symmetrise
        (the sum is symmetric up to rounding; eigh reads only one triangle).
        """
        covariances = {}
        for hooked, sharing in self.groups.items():
            if hooked not in self.sums or int(self.counts[hooked]) == 0:
                raise ValueError(f"no calibration tokens reached {hooked}")
            N, n = int(self.counts[hooked]), self.sums[hooked].shape[0]
            if N < n:
                warnings.warn(
                    f"{' / '.join(sharing)}: only N={N} calibration tokens for n={n} input "
                    f"features; the covariance is rank-deficient, so the null basis is an "
                    f"arbitrary choice among {n - N} or more zero eigenvalues", stacklevel=2)
            S = self.sums[hooked]
            C = (S + S.T).div_(2 * N)
            for name in sharing:
                covariances[name] = C
        return covariances


def collect_covariances(model: nn.Module, batches, targets=ALL_TARGETS, *,
                        dtype=torch.float64, per_sample_max_norm: bool = False) -> dict[str, Tensor]:
    """{layer name: C = X.T @ X / N (n, n) float64} from calibration batches.

    batches: an iterable of `idx` (B, T) long tensors or `(idx, pad_mask)` pairs, pad_mask
    (B, T) bool with True = real token (or None). Padding never enters C.
    dtype: dtype of the per-batch product X.T @ X (float32 is ~2x faster on CPU); the
    running sums are float64 either way.
    per_sample_max_norm: divide each sequence's activations by the absolute value of their
    signed maximum first, as the reference code does. Off by default: it reweights samples
    by an arbitrary scale. (The reference also divides by a hard-coded sample count, not the
    token count; the overall scale of C does not change its eigenvectors.)
    """
    collector = CovarianceCollector(model, targets, dtype=dtype,
                                    per_sample_max_norm=per_sample_max_norm)
    for batch in batches:
        idx, pad_mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        collector.add_batch(idx, pad_mask)
    return collector.finalize()


def _batch_and_mask(batch, device) -> tuple[Tensor, Tensor | None]:
    """(idx, keep) on device from an `idx` or an `(idx, pad_mask)` calibration batch."""
    idx, pad_mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
    idx = idx.to(device)
    keep = None if pad_mask is None else pad_mask.to(device=device, dtype=torch.bool)
    if keep is not None and keep.shape != idx.shape:
        raise ValueError(f"pad_mask shape {tuple(keep.shape)} != idx shape {tuple(idx.shape)}")
    return idx, keep


def calibrate_blockwise(model: nn.Module, batches, targets=ALL_TARGETS, *, init_block=None,
                        dtype=torch.float64, per_sample_max_norm: bool = False,
                        keep_covariances: bool = True, covariance_device=None, hidden_device=None,
                        distributed: bool = False) -> dict[str, Tensor]:
    """The covariances of collect_covariances, collected one transformer block at a time.

    collect_covariances runs every batch through the whole model with hooks in every block,
    so the running sums of all blocks are alive at once (LLaMA-2-7B: 32 blocks x 1.4 GB in
    float64). Here the calibration tokens travel through the model one block at a time:

        h_b = token embeddings of batch b, for every batch b          (N tokens x dim)
        for each block i:
            for each batch b: run block i on h_b with hooks (its 4 covariance sums),
                              and overwrite h_b with the block's output
            C_i = the block's covariances;  init_block(i, C_i);  then C_i is dropped

    Memory: the hidden states of all calibration tokens plus one block's sums, whatever the
    depth. Block i runs with the weights it had before init_block(i, ...), as in a forward
    of the whole model, so the covariances equal collect_covariances' bit for bit (same
    products in the same order), and so do the inits computed from them. (Every init keeps
    the block's output, so recomputing it after the init would change only rounding.)

    batches, targets, dtype, per_sample_max_norm: as in collect_covariances (train.py uses
        dtype=torch.float32 products; the sums are float64 either way).
    init_block(i, covariances): called when block i's {layer name: C} is complete, e.g. to
        initialise the block's adapters (inject_lora_blockwise does).
    keep_covariances: return every block's covariances (float64, moved to covariance_device,
        default the model's device; "cpu" keeps them off a GPU); False returns {}.
    hidden_device: where the hidden states wait between blocks (default the model's device).
    distributed: sum each block's sums and counts over the torch.distributed ranks; every
        rank passes its own share of the batches (at least one batch each).
    """
    config = model.config
    device = next(model.parameters()).device
    hidden_device = device if hidden_device is None else torch.device(hidden_device)
    covariances, moved = {}, {}  # moved: id of a block's C -> its copy, so sharing survives
    spare = {}  # the last block's sums by role ("attention.wq"), zeroed and reused by the next
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs = [_batch_and_mask(batch, device) for batch in batches]
            hidden = [model.tok_embeddings(idx).to(hidden_device) for idx, _ in inputs]  # (B, T, D) each
            for i, block in enumerate(model.layers):
                collector = CovarianceCollector(model, targets, dtype=dtype, blocks=[i],
                                                per_sample_max_norm=per_sample_max_norm)
                for name in collector.groups:  # fresh large buffers would cost page faults
                    role = name.split(".", 2)[2]
                    if role in spare:
                        collector.sums[name] = spare[role].zero_()
                        collector.counts[name] = torch.zeros((), dtype=torch.int64, device=spare[role].device)
                for b, (idx, keep) in enumerate(inputs):
                    positions, mask = model._positions_and_mask(idx, keep, None)
                    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
                    with collector.recording(keep):
                        hidden[b] = block(hidden[b].to(device), cos, sin, mask).to(hidden_device)
                if distributed:
                    for t in list(collector.sums.values()) + list(collector.counts.values()):
                        torch.distributed.all_reduce(t)
                block_covariances = collector.finalize()  # new tensors: the sums can be reused
                spare = {name.split(".", 2)[2]: S for name, S in collector.sums.items()}
                if init_block is not None:
                    init_block(i, block_covariances)
                if keep_covariances:
                    for name, C in block_covariances.items():
                        if id(C) not in moved:
                            moved[id(C)] = C.to(covariance_device or C.device)
                        covariances[name] = moved[id(C)]
                del collector, block_covariances
    finally:
        model.train(was_training)
    return covariances


def inject_lora_blockwise(model: nn.Module, batches, targets=ALL_TARGETS, *, r: int = 8,
                          alpha: float = 16, dropout: float = 0.0, init: str = "null",
                          freeze_A: bool = False, seed: int = 0, **calibration):
    """Calibrate and initialise the adapters block by block: (layers, covariances).

    The same adapters as `lora.inject_lora(model, targets, r, alpha, dropout, init,
    covariances=collect_covariances(model, batches, targets), freeze_A=freeze_A, seed=seed)`
    (vanilla's random A included: layers draw in the same order from one generator), but
    each block is initialised as soon as its covariances are complete, so they can be
    dropped (keep_covariances=False) before the next block runs. Layers that read the same
    input share one eigh for the null basis. **calibration: the keywords of
    calibrate_blockwise (dtype, keep_covariances, covariance_device, hidden_device, ...).
    """
    import lora  # lora imports this module; importing it at call time avoids the cycle

    if init not in lora.INITS:
        raise ValueError(f"unknown init {init!r}; valid inits: {list(lora.INITS)}")
    names = lora.target_module_names(model, targets)  # module order, as inject_lora draws
    generator = torch.Generator().manual_seed(seed)
    layers = {}

    def init_block(i, covariances):
        bases = {}  # id(C) -> null basis of C, computed once per shared input
        for name in (n for n in names if n.startswith(f"layers.{i}.")):
            C = covariances[name] if init in lora.NEEDS_COVARIANCE else None
            layers[name] = lora.init_layer(model, name, init, r, alpha, dropout, freeze_A, C, generator, bases)

    covariances = calibrate_blockwise(model, batches, targets, init_block=init_block, **calibration)
    lora.mark_only_lora_trainable(model)
    return layers, covariances


# -----------------------------------------------------------------------------
# 2. The null basis and the LoRA-Null initialisation

def check_init_inputs(W: Tensor, C: Tensor, r: int, alpha: float):
    """Clear errors for the inputs shared by loranull_init and corda_init."""
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix (out, in), got shape {tuple(W.shape)}")
    m, n = W.shape
    if tuple(C.shape) != (n, n):
        raise ValueError(f"covariance shape {tuple(C.shape)} does not match W {m}x{n}: "
                         f"expected ({n}, {n}) for the layer's input dimension n={n}")
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must satisfy 1 <= r <= min(m, n) = {min(m, n)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not all_finite(W):
        raise ValueError("W contains NaN/Inf")
    if not all_finite(C):
        raise ValueError("covariance contains NaN/Inf")


def null_basis(C: Tensor, r: int) -> Tensor:
    """U_null (n, r) float64: the eigenvectors of C with the r smallest eigenvalues.

    C is PSD, so these are the right singular vectors of X with the r smallest singular
    values: the orthonormal directions u along which the calibration inputs are
    (nearly) zero, X @ u ~ 0. eigh returns eigenvalues in ascending order.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(C.shape)}")
    if not 1 <= r <= C.shape[0]:
        raise ValueError(f"rank r={r} must satisfy 1 <= r <= n = {C.shape[0]}")
    if not all_finite(C):
        raise ValueError("covariance contains NaN/Inf")
    _, Q = torch.linalg.eigh(C.to(torch.float64))  # Q (n, n), columns by ascending eigenvalue
    return Q[:, :r]


def loranull_init(W: Tensor, C: Tensor, r: int, alpha: float, *,
                  U_null: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA-Null: A, B from the projection of W onto the null space of the activations.

    The paper's construction (Tang et al. 2025, the LoRA-Null method section):
        U_null = eigenvectors of C = X.T X / N with the r smallest eigenvalues   (n, r)
        W_null = W @ U_null @ U_null.T          (the weight seen only by null directions)
        W_null = U' diag(S') V'.T               (its SVD, rank <= r)
        A = diag(sqrt(S'/s)) V'.T,  B = U' diag(sqrt(S'/s)),  W_res = W - s B A = W - W_null
    The reference code takes the SVD of the (m, n) matrix W_null. Since W_null = (W U_null)
    U_null.T, the thin SVD of the small (m, r) matrix W U_null = U' diag(S') Q'.T gives the
    same factors with V' = U_null Q' (orthonormal because U_null and Q' are): O(m r^2)
    instead of O(m n min(m, n)). Computed in float64, returned in W's dtype.

    Returns A (r, n), B (m, r), W_res (m, n) with W_res + s * B @ A == W, s = alpha / r,
    and every row of A in span(U_null), so A @ x ~ 0 for knowledge-like inputs x.
    U_null: null_basis(C, r) when it is already known (layers that read the same input
    share C, and the eigh is the expensive step).
    """
    check_init_inputs(W, C, r, alpha)
    s = alpha / r
    W64 = W.detach().to(torch.float64)
    U_null = null_basis(C.to(W.device), r) if U_null is None else U_null.to(W.device, torch.float64)  # (n, r)
    U_w, S, Qh = torch.linalg.svd(W64 @ U_null, full_matrices=False)  # (m, r), (r,), (r, r)
    root = torch.sqrt(S / s)  # (r,)
    A = root[:, None] * (Qh @ U_null.T)  # (r, n) = diag(sqrt(S/s)) (U_null Q').T
    B = U_w * root[None, :]  # (m, r)
    W_res = W64 - s * (B @ A)  # = W (I - U_null U_null.T)
    return A.to(W.dtype), B.to(W.dtype), W_res.to(W.dtype)


# -----------------------------------------------------------------------------
# 3. CorDA, knowledge-preserved mode (a baseline; LoRA-Null's code is a fork of CorDA's)

def damped_covariance(C: Tensor, *, damp: float = 0.01, tol: float = 0.05,
                      max_doublings: int = 60) -> tuple[Tensor, float]:
    """(C', d) with C' = C + d * mean(diag C) * I, the first d = damp * 2^k that passes.

    The criterion is the reference's: ||C' @ inv(C') - I||_F < tol, evaluated in float32
    as the reference does (in float64 it would pass at once for any realistic n, because
    the damping bounds the condition number by 1 + n / d). C' is returned in float64.
    """
    C = C.to(torch.float64)
    scale = C.diagonal().mean()
    if not scale > 0:
        raise ValueError("covariance has a zero (or negative) mean diagonal: no calibration energy")
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for _ in range(max_doublings):
        C_damped = C + damp * scale * eye
        C32 = C_damped.to(torch.float32)
        error = torch.dist(C32 @ torch.linalg.inv(C32), eye.to(torch.float32))
        if error < tol:
            return C_damped, damp
        damp *= 2
    raise ValueError(f"damping did not make the covariance invertible to tol={tol}")


def corda_init(W: Tensor, C: Tensor, r: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """CorDA knowledge-preserved mode (Yang et al. 2024): the r smallest components of W C.

        C' = damped C (see damped_covariance);   W C' = U diag(S) V.T   (thin SVD)
        V' = inv(C') V,  so that W = U diag(S) V'.T exactly
        take the r SMALLEST singular triplets (U_r, S_r, V'_r):
        A = diag(sqrt(S_r/s)) V'_r.T,  B = U_r diag(sqrt(S_r/s)),  W_res = W - s B A
    CorDA itself uses s = 1; dividing S_r by s (as PEFT does) makes s * B @ A the same
    matrix U_r diag(S_r) V'_r.T for any alpha, so W_res does not depend on alpha and
    W_res + s * B @ A == W holds with s = alpha / r. Computed in float64, returned in W's dtype.
    """
    check_init_inputs(W, C, r, alpha)
    s = alpha / r
    W64 = W.detach().to(torch.float64)
    C_damped, _ = damped_covariance(C.to(W.device))
    U, S, Vh = torch.linalg.svd(W64 @ C_damped, full_matrices=False)  # (m,k),(k,),(k,n)
    V_prime = torch.linalg.solve(C_damped, Vh.T)  # (n, k) = inv(C') V
    U_r, S_r, V_r = U[:, -r:], S[-r:], V_prime[:, -r:]  # S is descending: the r smallest
    root = torch.sqrt(S_r / s)
    A = root[:, None] * V_r.T  # (r, n)
    B = U_r * root[None, :]  # (m, r)
    W_res = W64 - s * (B @ A)
    return A.to(W.dtype), B.to(W.dtype), W_res.to(W.dtype)


# -----------------------------------------------------------------------------
# 4. Diagnostics

def effective_rank(singular_values: Tensor) -> dict:
    """Entropy effective rank (Roy & Vetterli 2007) and energy counts of a spectrum.

    erank = exp(-sum_i p_i log p_i) with p_i = sigma_i / sum(sigma): n for a flat spectrum
    of n values, 1 for a single nonzero value.
    n90 / n99: the fewest components holding 90% / 99% of the energy sum(sigma^2).
    """
    sv = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if sv.numel() == 0 or not torch.isfinite(sv).all() or (sv < 0).any():
        raise ValueError("singular values must be a non-empty set of finite values >= 0")
    if sv.sum() == 0:
        raise ValueError("all singular values are zero: the effective rank is undefined")
    p = sv / sv.sum()
    p = p[p > 0]  # 0 log 0 = 0
    erank = math.exp(float(-(p * p.log()).sum()))
    energy = torch.sort(sv ** 2, descending=True).values
    cumulative = energy.cumsum(0) / energy.sum()  # share held by the first k components

    def count(q):  # smallest k with cumulative[k-1] >= q, forgiving rounding at 1e-12
        return min(int((cumulative < q - 1e-12).sum()) + 1, sv.numel())

    return {"erank": erank, "n90": count(0.90), "n99": count(0.99)}


def activation_singular_values(C: Tensor) -> Tensor:
    """Singular values of X / sqrt(N), descending: sqrt of C's eigenvalues (clamped at 0).

    The 1 / sqrt(N) scale does not change effective_rank. Rounding can make tiny
    eigenvalues of a PSD matrix slightly negative; they are clamped to 0.
    """
    eigenvalues = torch.linalg.eigvalsh(C.to(torch.float64))  # ascending
    return eigenvalues.clamp_min(0).sqrt().flip(0)


def weight_singular_values(W: Tensor) -> Tensor:
    """Singular values of W, descending (float64)."""
    return torch.linalg.svdvals(W.detach().to(torch.float64))


def captured_energy(A: Tensor, C: Tensor) -> float:
    """trace(P_A C) / trace(C): the share of calibration energy in A's row space.

    P_A is the orthogonal projector onto the row space of A (r, n), built from the right
    singular vectors of A whose singular values are not negligible, so a rank-deficient A
    projects onto its true (smaller) row space. By Ky Fan's theorem a k-dimensional space
    captures at least the sum of C's k smallest eigenvalues: LoRA-Null attains that minimum.
    """
    if A.ndim != 2 or tuple(C.shape) != (A.shape[1], A.shape[1]):
        raise ValueError(f"A {tuple(A.shape)} and C {tuple(C.shape)}: expected A (r, n), C (n, n)")
    C64 = C.to(torch.float64)
    _, S, Vh = torch.linalg.svd(A.detach().to(torch.float64), full_matrices=False)
    tol = S.max() * max(A.shape) * torch.finfo(A.dtype).eps  # rank threshold at A's precision
    basis = Vh[S > tol]  # (rank, n) orthonormal rows spanning A's row space
    return float(torch.trace(basis @ C64 @ basis.T) / torch.trace(C64))


def knowledge_disturbance(delta_W: Tensor, W: Tensor, C: Tensor) -> float:
    """||dW X^T||_F / ||W X^T||_F over the calibration inputs, computed from C alone.

    ||dW X^T||_F^2 = trace(dW X^T X dW^T) = N trace(dW C dW^T); N cancels in the ratio.
    For LoRA-Null v2 (A frozen) dW = s dB @ A and A X^T ~ 0, so this stays ~0.
    """
    if delta_W.shape != W.shape or tuple(C.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"shapes dW {tuple(delta_W.shape)}, W {tuple(W.shape)}, C {tuple(C.shape)} "
                         f"do not match: expected dW and W (m, n), C (n, n)")
    C64 = C.to(torch.float64)
    dW, W64 = delta_W.detach().to(torch.float64), W.detach().to(torch.float64)
    update = ((dW @ C64) * dW).sum()  # trace(dW C dW^T)
    base = ((W64 @ C64) * W64).sum()  # trace(W C W^T)
    if not base > 0:
        raise ValueError("W maps the calibration inputs to zero: the ratio is undefined")
    return math.sqrt(float(update.clamp_min(0) / base))
