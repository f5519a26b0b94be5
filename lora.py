"""LoRA in plain PyTorch: the adapter layer, the weight-based initialisations, injection.

LoRA (Hu et al. 2021, eq. 3) keeps a pre-trained linear layer y = x @ W.T frozen and learns
a low-rank update next to it:

    y = x @ W_res.T + s * (x @ A.T) @ B.T          A (r, in), B (out, r), s = alpha / r

The methods this project compares differ only in the starting point (A, B, W_res):

    vanilla  A random, B = 0, W_res = W                         (Hu et al. 2021)       here
    pissa    the r LARGEST singular triplets of W               (Meng et al. 2024)     here
    milora   the r SMALLEST singular triplets of W              (Wang et al. 2024)     here
    corda    smallest components of W @ C, C the input covariance (Yang et al. 2024)   nullspace.py
    null     W projected onto the null space of C               (Tang et al. 2025)     nullspace.py

All of them satisfy W_res + s * B @ A == W, so the model computes exactly what it computed
before training starts. PiSSA, MiLoRA, CorDA and LoRA-Null move part of W into the adapter
(W_res != W); the layer then keeps its starting factors (A0, B0), so the original weight is
W = W_res + s * B0 @ A0 and a saved adapter can be put back on the original weights.
With freeze_A only B trains (LoRA-FA; LoRA-Null v2 is init "null" with A frozen): the
update dW = s * dB @ A then stays inside the row space of A.

Shapes: m = out features, n = in features, r = rank. W is (m, n), as in nn.Linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model import PROJECTIONS


# ----------------------------------------------------------------------------------------
# The adapter layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + s * (x @ A.T) @ B.T.

    base   the wrapped nn.Linear, frozen; its weight is W, or W_res after an init that moved
           weight into the adapter
    A      (r, in)  down-projection;  B  (out, r)  up-projection;  s = alpha / r
    A0, B0 the starting factors, kept (as buffers) only when the init moved weight out of
           base (has_residual): the original weight is then W = W_res + s * B0 @ A0
    A and B are float32 whatever the base dtype (as PEFT does), so optimizer updates and a
    null-space A are not rounded to bfloat16; under autocast the matmuls still run in bf16.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 freeze_A: bool = False):
        super().__init__()
        check_rank(base.weight, r)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.freeze_A = freeze_A
        self.merged = False
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        m, n = base.weight.shape
        # zero until initialize() gives the init's factors: an init draws A, the layer never does
        self.A = nn.Parameter(torch.zeros(r, n, device=base.weight.device), requires_grad=not freeze_A)  # (r, n)
        self.B = nn.Parameter(torch.zeros(m, r, device=base.weight.device))                               # (m, r)
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)

    def forward(self, x):
        # exercise 3: the LoRA layer
        y = self.base(x)                                                    # (..., out)
        if self.merged:
            return y
        update = (self.dropout(x).to(self.A.dtype) @ self.A.T) @ self.B.T   # (..., r) -> (..., out)
        return y + (self.scaling * update).to(y.dtype)
        # end exercise 3

    @property
    def has_residual(self) -> bool:
        """True when base holds W_res = W - s * B0 @ A0 instead of the original W."""
        return self.B0 is not None

    @torch.no_grad()
    def initialize(self, A: torch.Tensor, B: torch.Tensor, W_res: torch.Tensor):
        """Start from an init's (A, B, W_res), used as given. Must be called on a fresh, unmerged layer.

        W_res must equal W - s * B @ A up to rounding (the identity every init keeps); one that
        differs by more is refused, never replaced. Every init forms it with residual_weight,
        the formula that puts a saved adapter back on the original weights, so both give the
        same bits.
        """
        if self.merged or self.has_residual:
            raise ValueError("initialize() needs a fresh, unmerged layer")
        W = self.base.weight
        if A.shape != self.A.shape or B.shape != self.B.shape or W_res.shape != W.shape:
            raise ValueError(f"init shapes A {tuple(A.shape)}, B {tuple(B.shape)}, W_res {tuple(W_res.shape)} "
                             f"do not fit A {tuple(self.A.shape)}, B {tuple(self.B.shape)}, W {tuple(W.shape)}")
        error = float((W_res.float() - residual_weight(W, A, B, self.scaling).float()).abs().max())
        if not error <= rounding_tolerance(W, A, B, self.scaling):
            raise ValueError(f"W_res differs from W - s * B @ A by {error:.3g}, more than rounding: "
                             f"an init must keep W_res + s * B @ A == W")
        self.A.copy_(A)
        self.B.copy_(B)
        if not torch.equal(W_res, W):  # the init moved weight into the adapter
            self.A0, self.B0 = self.A.detach().clone(), self.B.detach().clone()
            W.copy_(W_res)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, (out, in), float32: what merging adds to the base weight."""
        # exercise 3: the LoRA layer
        with torch.autocast(self.A.device.type, enabled=False):
            return self.scaling * (self.B.float() @ self.A.float())
        # end exercise 3

    @torch.no_grad()
    def merge(self):
        """Fold the update into base.weight (in float32, then back to its dtype). Idempotent."""
        # exercise 3: the LoRA layer
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True
        # end exercise 3

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): subtract the update again (exact up to float rounding). Idempotent."""
        # exercise 3: the LoRA layer
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False
        # end exercise 3

    def extra_repr(self) -> str:
        m, n = self.base.weight.shape
        return (f"in={n}, out={m}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"residual={self.has_residual}, freeze_A={self.freeze_A}, merged={self.merged}")


def residual_weight(W: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s * B0 @ A0, computed in float32 (float64 for a float64 W), returned in W's dtype."""
    dtype = factor_dtype(W)
    return torch.addmm(W.to(dtype), B0.to(dtype), A0.to(dtype), alpha=-scaling).to(W.dtype)


def rounding_tolerance(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """How far two roundings of W - s * B @ A may differ: a few ulps of W's dtype at the size of
    its terms (|W| and |s B A| <= s * |B| |A| row by column)."""
    size = float(W.abs().max()) + scaling * float(B.abs().sum(1).max()) * float(A.abs().max())
    return 8 * torch.finfo(W.dtype).eps * size


def update_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') float32 with W_now - W_original = s * B' @ A': the weight change so far.

    W_now = W_res + s B A and W_original = W_res + s B0 A0, so the change is
    s (B A - B0 A0) = s [B | -B0] @ [A; A0] (rank <= 2r); without a residual it is s B A.
    """
    B, A = layer.B.detach().float(), layer.A.detach().float()
    if layer.has_residual:
        B = torch.cat([B, -layer.B0.float()], dim=1)                        # (m, 2r)
        A = torch.cat([A, layer.A0.float()], dim=0)                          # (2r, n)
    return B, A


def check_rank(W: torch.Tensor, r: int, name: str = "W"):
    """A rank-r factorisation of an (m, n) weight needs 1 <= r <= min(m, n)."""
    if not 0 < r <= min(W.shape):
        raise ValueError(f"rank r={r} is too large for {name}: its weight is {tuple(W.shape)}, "
                         f"so r must be in 1..{min(W.shape)}")


# ----------------------------------------------------------------------------------------
# Weight-based initialisations: pure functions (W, r, alpha) -> (A, B, W_res),
# A and B in float32 (float64 for a float64 W), W_res in W's dtype


def factor_dtype(W: torch.Tensor) -> torch.dtype:
    """The dtype of an init's A and B: float32, or W's if wider. Never bfloat16: rounding A to
    bf16 would move LoRA-Null's A out of the null space (as PEFT, the factors stay float32)."""
    return torch.promote_types(W.dtype, torch.float32)


def vanilla_init(W: torch.Tensor, r: int, alpha: float, *, generator: torch.Generator | None = None):
    """LoRA (Hu et al. 2021, sec. 4.1): A random, B = 0, so B @ A = 0 and W_res = W.

    A is Kaiming-uniform with a = sqrt(5) (uniform in +-1/sqrt(in)), as nn.Linear and most
    LoRA libraries initialise it; the paper used a Gaussian. alpha does not enter. A is drawn
    on the CPU, so a seed gives the same numbers on any device.
    """
    check_rank(W, r)
    m, n = W.shape
    A = torch.empty(r, n)  # the one place a random A is drawn
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A.to(W.device, factor_dtype(W)), torch.zeros(m, r, device=W.device, dtype=factor_dtype(W)), W.clone()


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


def _svd_split(W: torch.Tensor, r: int, alpha: float, keep: slice, niter: int | None = None):
    """Split W along r singular triplets: W = U S V^T, keep U_r S_r V_r^T in the adapter.

    A = diag(sqrt(S_r / s)) @ V_r^T (r, n),  B = U_r @ diag(sqrt(S_r / s)) (m, r),
    so s * B @ A = U_r diag(S_r) V_r^T, and W_res = W - s * B @ A.
    """
    # exercise 4: PiSSA and MiLoRA
    s = alpha / r
    W32 = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W32, full_matrices=False)     # exact thin SVD, S descending
    else:
        U, S, V = torch.svd_lowrank(W32, q=r, niter=niter)       # randomized, top-r only
        Vh = V.T
    U_r, S_r, Vh_r = U[:, keep], S[keep], Vh[keep]                 # (m, r), (r,), (r, n)
    root = torch.sqrt(S_r / s)                                     # (r,)
    A = root[:, None] * Vh_r                                       # (r, n)
    B = U_r * root[None, :]                                        # (m, r)
    A, B = A.to(factor_dtype(W)), B.to(factor_dtype(W))
    return A, B, residual_weight(W, A, B, s)                       # W_res = W - s * B @ A (m, n)
    # end exercise 4


# ----------------------------------------------------------------------------------------
# Putting adapters into a model


def inject_lora(model: nn.Module, targets=("q", "k", "v", "o", "gate", "up", "down"), r: int = 8,
                alpha: float = 16, dropout: float = 0.0, freeze_A: bool = False,
                seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every target projection in a vanilla LoRALinear; freeze everything else.

    A is drawn by vanilla_init from one generator seeded with `seed`, layer after layer in
    module order, so a seed gives the same adapters. Other inits restart the layers from
    here (nullspace.init_adapters). Returns {module name: LoRALinear}.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in target_module_names(model, targets):
        layer = wrap_linear(model, name, r, alpha, dropout, freeze_A)
        layer.initialize(*vanilla_init(layer.base.weight, r, alpha, generator=generator))
        layers[name] = layer
    mark_only_lora_trainable(model)
    return layers


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


def target_module_names(model: nn.Module, targets) -> list[str]:
    """Short target names ("q", "down", ...) -> module names ("layers.0.attention.wq", ...)."""
    check_targets(targets)
    suffixes = tuple("." + PROJECTIONS[t] for t in targets)
    return [name for name, m in model.named_modules()
            if name.endswith(suffixes) and isinstance(m, (nn.Linear, LoRALinear))]


def check_targets(targets):
    """The one check of a list of short target names."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {list(PROJECTIONS)}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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
