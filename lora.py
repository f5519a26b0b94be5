"""LoRA in plain PyTorch: the adapter layer, the weight-based initialisations, injection.

LoRA (Hu et al. 2021, eq. 3) keeps a pre-trained linear layer y = x @ W.T frozen and learns
a low-rank update next to it:

    y = x @ W_res.T + s * (x @ A.T) @ B.T          A (r, in), B (out, r), s = alpha / r

Every method in this project differs only in how it chooses the starting point (A, B, W_res):

    vanilla  A random, B = 0, W_res = W                         (Hu et al. 2021)
    pissa    the r LARGEST singular triplets of W               (Meng et al. 2024)
    milora   the r SMALLEST singular triplets of W              (Wang et al. 2024)
    corda    smallest components of W @ C, C the input covariance (Yang et al. 2024; nullspace.py)
    null     W projected onto the null space of C               (Tang et al. 2025; nullspace.py)

All of them satisfy W_res + s * B @ A == W, so the model computes exactly what it computed
before training starts. The methods other than vanilla move part of W into the adapter
(W_res != W); a LoRALinear remembers its starting factors (A0, B0) so the residual can be
rebuilt from the original weights: W_res = W - s * B0 @ A0 (see loranull_mini/adapter_io.py).

LoRA-Null v2 is init "null" with freeze_A=True: only B trains, so the update dW = dB @ A
lives in the row space of A, the (approximate) null space of the pre-training activations.

Shapes: m = out features, n = in features, r = rank. W is (m, n), as in nn.Linear.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

import nullspace
from model import PROJECTIONS


def check_rank(W: torch.Tensor, r: int, name: str = "W"):
    """A rank-r factorisation of an (m, n) weight needs 1 <= r <= min(m, n)."""
    if not 0 < r <= min(W.shape):
        raise ValueError(f"rank r={r} is too large for {name}: its weight is {tuple(W.shape)}, "
                         f"so r must be in 1..{min(W.shape)}")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: recognises a base weight exactly."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))  # no copy
    return h.hexdigest()


def residual_weight(W: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s * B0 @ A0, computed in float32 and returned in W's dtype."""
    return torch.addmm(W.float(), B0.float(), A0.float(), alpha=-scaling).to(W.dtype)  # one GEMM, no temporaries


# ----------------------------------------------------------------------------------------
# The adapter layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + s * (x @ A.T) @ B.T.

    base   the wrapped nn.Linear, frozen; its weight is W (vanilla) or the residual W_res
    A      (r, in)  down-projection;  B  (out, r)  up-projection;  s = alpha / r
    A0, B0 the starting factors, kept (as buffers) only when the init moved weight out of
           base (has_residual): the original weight is then W = W_res + s * B0 @ A0
    The adapter parameters are float32 whatever the base dtype (as PEFT does), so optimizer
    updates are not lost to bf16 rounding; under autocast the matmuls still run in bf16.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 freeze_A: bool = False):
        super().__init__()
        check_rank(base.weight, r)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.freeze_A = freeze_A
        self.method = "vanilla"
        self.merged = False
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Identity of the weight we were given, before any init replaces it by a residual.
        self.base_sha256 = tensor_sha256(base.weight)
        A, B = vanilla_factors(base.weight, r)  # a valid default; inject_lora re-inits
        self.A = nn.Parameter(A.float(), requires_grad=not freeze_A)  # (r, n)
        self.B = nn.Parameter(B.float())                                # (m, r)
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)

    @property
    def has_residual(self) -> bool:
        """True when base holds W_res = W - s * B0 @ A0 instead of the original W."""
        return self.B0 is not None

    @torch.no_grad()
    def initialize(self, A: torch.Tensor, B: torch.Tensor, W_res: torch.Tensor, method: str = "vanilla"):
        """Start from an init's (A, B, W_res). Must be called on an unmerged, fresh layer."""
        if self.merged or self.has_residual:
            raise ValueError("initialize() needs a fresh, unmerged layer")
        if A.shape != self.A.shape or B.shape != self.B.shape or W_res.shape != self.base.weight.shape:
            raise ValueError(f"init shapes A {tuple(A.shape)}, B {tuple(B.shape)}, W_res {tuple(W_res.shape)} "
                             f"do not fit A {tuple(self.A.shape)}, B {tuple(self.B.shape)}, "
                             f"W {tuple(self.base.weight.shape)}")
        self.A.copy_(A)
        self.B.copy_(B)
        self.method = method
        if not torch.equal(W_res, self.base.weight):  # the init moved weight into the adapter
            self.A0 = A.detach().float().clone()
            self.B0 = B.detach().float().clone()
            # One formula for the residual, here and when an adapter is reloaded onto the
            # original weights, so a reloaded model is bit-identical: W_res = W - s * B0 @ A0
            # (the init's own W_res equals it up to float rounding).
            self.base.weight.copy_(residual_weight(self.base.weight, self.A0, self.B0, self.scaling))

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, (out, in), float32: what merging adds to the base weight."""
        with torch.autocast(self.A.device.type, enabled=False):
            return self.scaling * (self.B.float() @ self.A.float())

    @torch.no_grad()
    def merge(self):
        """Fold the update into base.weight (in float32, then back to its dtype). Idempotent."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): subtract the update again (exact up to float rounding). Idempotent."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x):
        y = self.base(x)                                    # (..., out)
        if self.merged:
            return y
        h = self.dropout(x).to(self.A.dtype) @ self.A.T     # (..., r)
        # y + s * h @ B.T as one GEMM that adds into y (addmm): no (..., out) temporaries
        # for the product, its scaling and the sum.
        out = torch.addmm(y.reshape(-1, y.shape[-1]).to(h.dtype), h.reshape(-1, self.r), self.B.T,
                          alpha=self.scaling)               # (tokens, out)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        m, n = self.base.weight.shape
        return (f"in={n}, out={m}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"method={self.method}, residual={self.has_residual}, freeze_A={self.freeze_A}, "
                f"merged={self.merged}")


# ----------------------------------------------------------------------------------------
# Weight-based initialisations: pure functions (W, r, alpha) -> (A, B, W_res)


def vanilla_init(W: torch.Tensor, r: int, alpha: float, *, generator: torch.Generator | None = None):
    """LoRA (Hu et al. 2021, sec. 4.1): A random, B = 0, so B @ A = 0 and W_res = W.

    A is Kaiming-uniform with a = sqrt(5) (uniform in +-1/sqrt(in)), as nn.Linear and most
    LoRA libraries initialise it; the paper used a Gaussian. alpha does not enter.
    """
    A, B = vanilla_factors(W, r, generator)
    return A, B, W.clone()


def vanilla_factors(W: torch.Tensor, r: int, generator: torch.Generator | None = None):
    """vanilla_init's A (Kaiming-uniform) and B (zeros), without copying W."""
    m, n = W.shape
    A = torch.empty(r, n, dtype=torch.float32)                     # drawn on the CPU: same numbers on any device
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    B = torch.zeros(m, r, dtype=torch.float32)
    return A.to(W.device, W.dtype), B.to(W.device, W.dtype)


def _svd_split(W: torch.Tensor, r: int, alpha: float, keep: slice, niter: int | None = None):
    """Split W along r singular triplets: W = U S V^T, keep U_r S_r V_r^T in the adapter.

    A = diag(sqrt(S_r / s)) @ V_r^T (r, n),  B = U_r @ diag(sqrt(S_r / s)) (m, r),
    so s * B @ A = U_r diag(S_r) V_r^T, and W_res = W - s * B @ A.
    """
    s = alpha / r
    W32 = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W32, full_matrices=False)     # exact thin SVD, S descending
    else:
        U, S, V = torch.svd_lowrank(W32, q=r, niter=niter)       # randomized, top-r only
        Vh = V.T
    U_r, S_r, Vh_r = U[:, keep], S[keep], Vh[keep]                 # (m, r), (r,), (r, n)
    root = torch.sqrt(S_r / s)                                     # sqrt(S_r / s), (r,)
    A = root[:, None] * Vh_r                                       # (r, n)
    B = U_r * root[None, :]                                        # (m, r)
    W_res = torch.addmm(W32, B, A, alpha=-s)                       # (m, n) = W - s B A, one GEMM
    return A.to(W.dtype), B.to(W.dtype), W_res.to(W.dtype)


def pissa_init(W: torch.Tensor, r: int, alpha: float, *, niter: int | None = None):
    """PiSSA (Meng et al. 2024, eq. 2-4): the adapter takes the r LARGEST singular triplets.

    W = U S V^T; A = S_r^{1/2} V_r^T, B = U_r S_r^{1/2} (divided by sqrt(s) for scale s),
    W_res = U_[r:] S_[r:] V_[r:]^T. niter=None: exact float32 SVD (the reference);
    niter=k: torch.svd_lowrank with k subspace iterations (fast; uses the global RNG).
    """
    check_rank(W, r)
    return _svd_split(W, r, alpha, slice(0, r), niter)


def milora_init(W: torch.Tensor, r: int, alpha: float):
    """MiLoRA (Wang et al. 2024, eq. 3-5): the adapter takes the r SMALLEST singular triplets.

    Same split as PiSSA with the minor components W^m = U_[-r:] S_[-r:] V_[-r:]^T, which
    the authors argue carry the least pre-trained knowledge; W_res keeps the principal part.
    """
    check_rank(W, r)
    return _svd_split(W, r, alpha, slice(-r, None))


# name -> init function. "corda" and "null" take the input covariance C as well:
# (W, C, r, alpha) -> (A, B, W_res); C comes from nullspace.collect_covariances.
INITS = {
    "vanilla": vanilla_init,
    "pissa": pissa_init,
    "milora": milora_init,
    "corda": nullspace.corda_init,
    "null": nullspace.loranull_init,
}
NEEDS_COVARIANCE = {"corda", "null"}


def init_factors(init: str, W: torch.Tensor, r: int, alpha: float, C: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
    """Dispatch to INITS[init] with the arguments that init takes."""
    if init == "vanilla":
        return vanilla_init(W, r, alpha, generator=generator)
    if init in NEEDS_COVARIANCE:
        return INITS[init](W, C, r, alpha)
    return INITS[init](W, r, alpha)


# ----------------------------------------------------------------------------------------
# Putting adapters into a model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_module_names(model: nn.Module, targets) -> list[str]:
    """Short target names ("q", "down", ...) -> module names ("layers.0.attention.wq", ...)."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {list(PROJECTIONS)}")
    suffixes = tuple("." + PROJECTIONS[t] for t in targets)
    return [name for name, m in model.named_modules()
            if name.endswith(suffixes) and isinstance(m, (nn.Linear, LoRALinear))]


def wrap_linear(model: nn.Module, name: str, r: int, alpha: float, dropout: float = 0.0,
                freeze_A: bool = False) -> LoRALinear:
    """Replace the nn.Linear called `name` by a LoRALinear around it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, child)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already has a LoRA adapter")
    check_rank(base.weight, r, name)
    layer = LoRALinear(base, r, alpha, dropout, freeze_A)
    setattr(parent, child, layer)
    return layer


def inject_lora(model: nn.Module, targets=("q", "k", "v", "o", "gate", "up", "down"), r: int = 8,
                alpha: float = 16, dropout: float = 0.0, init: str = "vanilla",
                covariances: dict[str, torch.Tensor] | None = None, freeze_A: bool = False,
                seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every target projection in a LoRALinear initialised by `init`; freeze the rest.

    covariances: {module name: C (in, in)} for the covariance-based inits ("corda", "null").
    seed: seeds vanilla's random A (layers draw in module order from one generator).
    Returns {module name: LoRALinear}. LoRA-Null v2 is init="null", freeze_A=True.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid inits: {list(INITS)}")
    names = target_module_names(model, targets)
    if init in NEEDS_COVARIANCE:
        missing = [n for n in names if covariances is None or n not in covariances]
        if missing:
            raise ValueError(f"init {init!r} needs the input covariance of every target layer; missing "
                             f"for {missing[:3]}{'...' if len(missing) > 3 else ''}; compute them with "
                             f"nullspace.collect_covariances(model, batches, targets)")
    generator = torch.Generator().manual_seed(seed)
    bases = {}  # id(C) -> null basis: q/k/v (and gate/up) read one input, so share one eigh
    layers = {}
    for name in names:
        C = covariances[name] if init in NEEDS_COVARIANCE else None
        layers[name] = init_layer(model, name, init, r, alpha, dropout, freeze_A, C, generator, bases)
    mark_only_lora_trainable(model)
    return layers


def init_layer(model: nn.Module, name: str, init: str, r: int, alpha: float, dropout: float = 0.0,
               freeze_A: bool = False, C: torch.Tensor | None = None,
               generator: torch.Generator | None = None, bases: dict | None = None) -> LoRALinear:
    """Wrap the linear `name` in a LoRALinear started from INITS[init].

    C: the layer's input covariance (corda, null). bases: a dict shared by the layers that
    read the same input, so LoRA-Null computes one null basis (one eigh) per distinct C.
    """
    layer = wrap_linear(model, name, r, alpha, dropout, freeze_A)
    W = layer.base.weight.detach()
    try:
        if init == "null" and bases is not None:
            if id(C) not in bases:
                bases[id(C)] = nullspace.null_basis(C.to(W.device), r)
            A, B, W_res = nullspace.loranull_init(W, C, r, alpha, U_null=bases[id(C)])
        else:
            A, B, W_res = init_factors(init, W, r, alpha, C, generator)
    except ValueError as e:
        raise ValueError(f"{init} init of {name}: {e}") from None
    layer.initialize(A, B, W_res, method=init)
    return layer


def mark_only_lora_trainable(model: nn.Module):
    """requires_grad only for the adapters' B (and A unless freeze_A); everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.B.requires_grad_(True)
        layer.A.requires_grad_(not layer.freeze_A)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors: A, B of every layer, and A0, B0 where the init moved weight.

    With the ORIGINAL base weights these restore the adapted model exactly
    (W_res = W - s * B0 @ A0); see loranull_mini/adapter_io.py.
    """
    out = {}
    for name, layer in lora_layers(model).items():
        for key in ("A", "B", "A0", "B0"):
            t = getattr(layer, key)
            if t is not None:
                out[f"{name}.{key}"] = t.detach()
    return out


def merge_lora(model: nn.Module):
    """Fold every adapter into its base weight (inference without the extra matmuls)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge and put the plain nn.Linear modules back: a model with the state-dict names of
    the original, holding the fine-tuned weights W_res + s * B @ A (e.g. for save_hf)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
