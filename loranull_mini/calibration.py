"""Calibration for real model sizes: block by block, with memory tricks, across processes.

nullspace.collect_covariances is the readable version: one forward hook per distinct layer
input, a float64 product per batch, every block's sums alive at once. This module computes
the same covariances (tests: equal to that hook to rounding, and block by block equal to
whole-model collection bit for bit) in the form a 7B model needs:

- CovarianceCollector: running float64 sums of X.T @ X per distinct input, the products in
  float32 or float64 (`dtype`), formed from the lower row panels only (the product is
  symmetric: (k + 1) / 2k of the FLOPs for k panels, ~0.54 for the 1536-wide input), each
  panel added straight into a running sum of the product dtype, which enters the float64
  sums every batch (FOLD_TOKENS rows, see there); the sums are kept exactly
  symmetric, so C = S / N in one pass; NaN/Inf found on the products' diagonal; the
  reference's per-sample signed-max normalisation as an option;
- calibrate_blockwise: the calibration tokens travel through the model one block at a
  time, so only one block's sums (plus the tokens' hidden states) are alive, whatever the
  depth; each block's adapters can be initialised as soon as its covariances are complete
  (inject_blockwise); sums are all-reduced over torch.distributed ranks; the last block's
  sums are zeroed and reused by the next (a fresh large buffer costs page faults);
- inject_blockwise: calibration + nullspace.init_adapters, block by block. The mathematics
  is nullspace.py's: each C comes from nullspace.covariance, each init from nullspace.INITS
  (null_basis's eigh by default; a faster basis function such as fastbasis's can be passed in).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

import lora
import nullspace
from model import PROJECTIONS, rotary_cos_sin


# Which tensor each projection reads inside a LLaMA block: q, k and v all read the output
# of attention_norm, gate and up both read the output of ffn_norm: one covariance serves
# each group, so a block needs 4 covariances, not 7.
SHARED_INPUT = {"q": "attention_norm", "k": "attention_norm", "v": "attention_norm", "o": "attention_output",
                "gate": "ffn_norm", "up": "ffn_norm", "down": "swiglu_output"}


def input_groups(model: nn.Module, targets=nullspace.ALL_TARGETS, blocks=None) -> dict[str, list[str]]:
    """{hooked layer: the target layers that read its input}, for every block (or `blocks`).

    E.g. block 3 with all targets: {"layers.3.attention.wq": [wq, wk, wv], "...wo": [wo],
    "...w_gate": [w_gate, w_up], "...w_down": [w_down]}. The first layer of a group is hooked.
    """
    lora.check_targets(targets)
    groups = {}
    for i in range(len(model.layers)) if blocks is None else blocks:
        hooked = {}  # shared input -> the layer hooked for it
        for t in dict.fromkeys(targets):
            name = f"layers.{i}.{PROJECTIONS[t]}"
            groups.setdefault(hooked.setdefault(SHARED_INPUT[t], name), []).append(name)
    return groups


PANEL_WIDTH = 128  # columns per row panel of the lower-triangle products (measured: 96-192 are alike)
# rows whose products may be summed in the product dtype before they enter the float64 sums. 1: every
# batch's product enters them on its own, so 1 and 2 processes (batches dealt whole) sum the same
# float32 products and differ only in the order of float64 additions; a larger value saves one
# n x n cast-and-add per batch (under 0.1% of a 1024-token batch's product) and loses that equality.
FOLD_TOKENS = 1


def row_panels(n: int, panels: int | None = None) -> list[tuple[int, int]]:
    """[(a, b), ...]: the columns 0..n cut into `panels` slices (default: about PANEL_WIDTH wide)."""
    k = max(1, min(n, round(n / PANEL_WIDTH) if panels is None else panels))
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def add_lower_gram_(P: Tensor, x: Tensor, panels: list[tuple[int, int]]) -> Tensor:
    """P[a:b, :b] += x[:, a:b].T @ x[:, :b] for every row panel (a, b), in place, in x's dtype.

    These panels hold the block lower triangle of x.T @ x (diagonal blocks whole): (k + 1) / 2k
    of the full product's FLOPs for k panels, each panel one product added straight into P
    (no temporary). P's upper off-diagonal blocks are not touched; add_symmetric_ completes them.
    """
    for a, b in panels:
        P[a:b, :b].addmm_(x[:, a:b].T, x[:, :b])
    return P


def add_symmetric_(S: Tensor, P: Tensor, panels: list[tuple[int, int]]) -> Tensor:
    """S += the symmetric matrix whose block lower triangle P holds (add_lower_gram_'s panels).

    The off-diagonal blocks are added as they are and, transposed, into the mirror blocks;
    each diagonal block D as (D + D^T) / 2. Every value is added at (i, j) and (j, i) alike,
    so an exactly symmetric S stays exactly symmetric. P may have a narrower dtype than S.
    """
    for a, b in panels:
        S[a:b, :a] += P[a:b, :a]
        S[:a, a:b] += P[a:b, :a].T
        D = P[a:b, a:b]
        S[a:b, a:b] += (D + D.T) / 2
    return S


def add_gram_(S: Tensor, x: Tensor, blocks: int | None = None) -> Tensor:
    """S += x.T @ x in place, for x (N, n) and S (n, n) float64, from the lower row panels only
    (`blocks` panels, default about PANEL_WIDTH columns each; see add_lower_gram_)."""
    panels = row_panels(x.shape[1], blocks)
    P = add_lower_gram_(torch.zeros(S.shape, dtype=x.dtype, device=x.device), x, panels)
    return add_symmetric_(S, P, panels)


def symmetrize_(S: Tensor, panels: list[tuple[int, int]]) -> Tensor:
    """Make S exactly symmetric in place: its lower off-diagonal blocks copied to the upper ones,
    each diagonal block replaced by (D + D^T) / 2 (after an all-reduce, which may add the two
    halves in different orders)."""
    for a, b in panels:
        S[:a, a:b] = S[a:b, :a].T
        D = S[a:b, a:b]
        D.copy_((D + D.T) / 2)
    return S


def signed_max_per_sequence(x: Tensor, keep: Tensor | None) -> Tensor:
    """The reference code's per-sample scale: |max(x)| over each sequence's real tokens.

    The SIGNED maximum's absolute value (x.max().abs()), not max(|x|), as in the LoRA-Null
    and CorDA reference hooks. Returns (B, 1, 1) for x (B, T, n).
    """
    if keep is not None:
        x = x.masked_fill(~keep[:, :, None], float("-inf"))  # padding never wins the max
    return x.amax(dim=(1, 2)).abs().clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]


class CovarianceCollector:
    """Running sums of X.T @ X (float64) and token counts, one per distinct layer input.

    `c = CovarianceCollector(model); c.add_batch(idx, pad_mask) ...; C = c.finalize()`.
    Under data parallelism, call c.flush(), then all-reduce (sum) every tensor of `c.sums` and
    `c.counts`, then finalize(); the entries appear at the first add_batch, so every process
    needs a batch.
    dtype: of the products (float32 is ~2x faster on a CPU). Each batch's product panels are
    added into a running sum of that dtype (`partial`), which enters the float64 `sums` every
    fold_tokens rows (default: every batch) and at flush().
    blocks: hook only these transformer blocks.
    """

    def __init__(self, model: nn.Module, targets=nullspace.ALL_TARGETS, *, dtype=torch.float64,
                 per_sample_max_norm: bool = False, blocks=None, fold_tokens: int = FOLD_TOKENS):
        self.model = model
        self.groups = input_groups(model, targets, blocks)
        self.dtype = dtype
        self.per_sample_max_norm = per_sample_max_norm
        self.fold_tokens = fold_tokens
        self.sums: dict[str, Tensor] = {}      # float64, exactly symmetric
        self.counts: dict[str, Tensor] = {}
        self.partial: dict[str, Tensor] = {}   # dtype, the lower row panels of the products since the last fold
        self.pending: dict[str, int] = {}      # rows in partial

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
        if name not in self.partial:
            self.partial[name] = torch.zeros(n, n, dtype=self.dtype, device=x.device)
            self.pending[name] = 0
        add_lower_gram_(self.partial[name], x, row_panels(n))
        if not torch.isfinite(self.partial[name].diagonal()).all():  # sums of x_i^2: NaN/Inf anywhere shows
            raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
        self.counts[name] += x.shape[0]
        self.pending[name] += x.shape[0]
        if self.pending[name] >= self.fold_tokens:
            self._fold(name)

    def _fold(self, name: str):
        """sums[name] += the symmetric product held in partial[name]; partial starts again at zero."""
        P = self.partial[name]
        add_symmetric_(self.sums[name], P, row_panels(P.shape[0]))
        P.zero_()
        self.pending[name] = 0

    def flush(self):
        """Fold every partial sum into the float64 sums (before an all-reduce of `sums`)."""
        for name, rows in self.pending.items():
            if rows:
                self._fold(name)

    @contextlib.contextmanager
    def recording(self, keep: Tensor | None):
        """Inside this context every forward of a hooked layer adds its input to the sums.

        keep (B, T) bool marks the real tokens of the batch that will run (None: all real).
        Nothing is stored on modules; the hooks are removed on leaving, also after an error.
        """
        def make_hook(name):
            return lambda module, args, output: self._accumulate(name, args[0].detach(), keep)

        handles = []
        try:
            for name in self.groups:
                handles.append(self.model.get_submodule(name).register_forward_hook(make_hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_batch(self, idx: Tensor, pad_mask: Tensor | None = None):
        """Run the model once on idx (B, T) (eval mode, no_grad) and accumulate every hooked input."""
        idx, keep = batch_and_mask((idx, pad_mask), next(self.model.parameters()).device)
        was_training = self.model.training
        try:
            self.model.eval()
            with self.recording(keep), torch.no_grad():
                self.model(idx, pad_mask=keep)
        finally:
            self.model.train(was_training)

    def finalize(self) -> dict[str, Tensor]:
        """{layer: C (n, n) float64} by nullspace.covariance (S is exactly symmetric, so C = S / N
        bit for bit); layers sharing an input share C."""
        self.flush()
        covariances = {}
        for hooked, sharing in self.groups.items():
            C = nullspace.covariance(self.sums.get(hooked), int(self.counts.get(hooked, 0)), " / ".join(sharing))
            covariances.update(dict.fromkeys(sharing, C))
        return covariances


def batch_and_mask(batch, device) -> tuple[Tensor, Tensor | None]:
    """(idx, keep) on device from an `idx` or an `(idx, pad_mask)` calibration batch."""
    idx, pad_mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
    idx = idx.to(device)
    keep = None if pad_mask is None else pad_mask.to(device=device, dtype=torch.bool)
    if keep is not None and keep.shape != idx.shape:
        raise ValueError(f"pad_mask shape {tuple(keep.shape)} != idx shape {tuple(idx.shape)}")
    return idx, keep


def calibrate(model: nn.Module, batches, targets=nullspace.ALL_TARGETS, *, dtype=torch.float64,
              per_sample_max_norm: bool = False) -> dict[str, Tensor]:
    """nullspace.collect_covariances with the collector's options, over the whole model at once.

    per_sample_max_norm: divide each sequence's activations by the absolute value of their
    signed maximum first, as the reference code does (off by default: it reweights samples
    by an arbitrary scale).
    """
    collector = CovarianceCollector(model, targets, dtype=dtype, per_sample_max_norm=per_sample_max_norm)
    for batch in batches:
        collector.add_batch(*batch_and_mask(batch, "cpu"))
    return collector.finalize()


def calibrate_blockwise(model: nn.Module, batches, targets=nullspace.ALL_TARGETS, *, init_block=None,
                        dtype=torch.float64, per_sample_max_norm: bool = False,
                        keep_covariances: bool = True, covariance_device=None, hidden_device=None,
                        distributed: bool = False) -> dict[str, Tensor]:
    """The covariances of `calibrate`, collected one transformer block at a time.

        h_b = token embeddings of batch b, for every batch b          (N tokens x dim)
        for each block i:
            for each batch b: run block i on h_b with hooks (its covariance sums),
                              and overwrite h_b with the block's output
            C_i = the block's covariances;  init_block(i, C_i);  then C_i is dropped

    Memory: the hidden states of all calibration tokens plus one block's sums. Block i runs
    with the weights it had before init_block(i, ...), as in a forward of the whole model,
    so the covariances equal `calibrate`'s bit for bit (same products in the same order).

    init_block(i, covariances): called when block i's {layer name: C} is complete.
    keep_covariances: return every block's covariances (moved to covariance_device, default
        the model's device); False returns {}.
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
            inputs = [batch_and_mask(batch, device) for batch in batches]
            hidden = [model.tok_embeddings(idx).to(hidden_device) for idx, _ in inputs]  # (B, T, D) each
            for i, block in enumerate(model.layers):
                collector = CovarianceCollector(model, targets, dtype=dtype, blocks=[i],
                                                per_sample_max_norm=per_sample_max_norm)
                for name in collector.groups:
                    role = name.split(".", 2)[2]
                    if role in spare:
                        S, P = spare[role]  # P is zero: the last block's finalize folded it
                        collector.sums[name], collector.partial[name] = S.zero_(), P
                        collector.counts[name] = torch.zeros((), dtype=torch.int64, device=S.device)
                        collector.pending[name] = 0
                for b, (idx, keep) in enumerate(inputs):
                    positions, mask = model._positions_and_mask(idx, keep, None)
                    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
                    with collector.recording(keep):
                        hidden[b] = block(hidden[b].to(device), cos, sin, mask).to(hidden_device)
                collector.flush()
                if distributed:
                    for t in list(collector.sums.values()) + list(collector.counts.values()):
                        torch.distributed.all_reduce(t)
                    for S in collector.sums.values():  # ranks' sums may arrive in different orders
                        symmetrize_(S, row_panels(S.shape[0]))
                block_covariances = collector.finalize()  # new tensors: the sums can be reused
                spare = {name.split(".", 2)[2]: (S, collector.partial[name]) for name, S in collector.sums.items()}
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


def inject_blockwise(model: nn.Module, batches, targets=nullspace.ALL_TARGETS, *, r: int = 8,
                     alpha: float = 16, dropout: float = 0.0, init: str = "null",
                     freeze_A: bool = False, seed: int = 0, basis=nullspace.null_basis, **calibration):
    """Calibrate and initialise the adapters block by block: (layers, covariances).

    The same adapters as `nullspace.inject_adapters(model, targets, r, alpha, dropout, init,
    covariances=calibrate(model, batches, targets), freeze_A=freeze_A, seed=seed, basis=basis)`
    (vanilla's random A included: layers draw in the same order from one generator), but each
    block is initialised by nullspace.init_adapters as soon as its covariances are complete,
    so they can be dropped (keep_covariances=False) before the next block runs.
    basis(C, r) -> U_null: nullspace.null_basis (eigh) or a faster function of the same
    contract (loranull_mini.fastbasis.smallest_eigenvectors). **calibration: the keywords of
    calibrate_blockwise (dtype, keep_covariances, covariance_device, hidden_device, ...).
    """
    nullspace.check_init(init)
    names = lora.target_module_names(model, targets)  # module order, as inject_adapters draws
    generator = torch.Generator().manual_seed(seed)
    layers = {}

    def init_block(i, covariances):
        block_layers = {name: lora.wrap_linear(model, name, r, alpha, dropout, freeze_A)
                        for name in names if name.startswith(f"layers.{i}.")}
        nullspace.init_adapters(block_layers, init, covariances, generator=generator, basis=basis)
        layers.update(block_layers)

    covariances = calibrate_blockwise(model, batches, targets, init_block=init_block, **calibration)
    lora.mark_only_lora_trainable(model)
    return layers, covariances
