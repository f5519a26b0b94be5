"""Calibration for real model sizes: block by block, with memory tricks, across processes.

nullspace.collect_covariances is the readable version: one forward hook per distinct layer
input, a float64 product per batch, every block's sums alive at once. This module computes
the same covariances (tests: equal to that hook to rounding, and block by block equal to
whole-model collection bit for bit) in the form a 7B model needs:

- CovarianceCollector: running float64 sums of X.T @ X per distinct input, the products in
  float32 or float64 (`dtype`), formed from the lower column blocks only (the product is
  symmetric: 5/8 of the FLOPs for 4 blocks), added straight into the sums (no (n, n)
  temporary); NaN/Inf found on the product's diagonal; the reference's per-sample
  signed-max normalisation as an option;
- calibrate_blockwise: the calibration tokens travel through the model one block at a
  time, so only one block's sums (plus the tokens' hidden states) are alive, whatever the
  depth; each block's adapters can be initialised as soon as its covariances are complete
  (inject_blockwise); sums are all-reduced over torch.distributed ranks; the last block's
  sums are zeroed and reused by the next (a fresh large buffer costs page faults);
- inject_blockwise: calibration + init by nullspace.INITS, one null basis per distinct input.
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
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(PROJECTIONS)}")
    groups = {}
    for i in range(len(model.layers)) if blocks is None else blocks:
        hooked = {}  # shared input -> the layer hooked for it
        for t in dict.fromkeys(targets):
            name = f"layers.{i}.{PROJECTIONS[t]}"
            groups.setdefault(hooked.setdefault(SHARED_INPUT[t], name), []).append(name)
    return groups


def add_gram_(S: Tensor, x: Tensor, blocks: int = 4) -> Tensor:
    """S += x.T @ x in place, for x (N, n) and S (n, n) float64, using the product's symmetry.

    The columns of x are cut into `blocks` slices; only the products of slice pairs on and
    below the diagonal are computed, (k + 1) / 2k of the full product's FLOPs for k blocks,
    each added into its block of S and, transposed, into the mirror block.
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
    """True when t holds no NaN/Inf. A sum is finite only if every term is, so one cheap
    reduction settles it; only a sum that overflowed needs the element-wise test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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
    Under data parallelism, all-reduce (sum) every tensor of `c.sums` and `c.counts` before
    finalize(); the entries appear at the first add_batch, so every process needs a batch.
    dtype: of the per-batch products (float32 is ~2x faster on a CPU); sums are float64.
    blocks: hook only these transformer blocks.
    """

    def __init__(self, model: nn.Module, targets=nullspace.ALL_TARGETS, *, dtype=torch.float64,
                 per_sample_max_norm: bool = False, blocks=None):
        self.model = model
        self.groups = input_groups(model, targets, blocks)
        self.dtype = dtype
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
        if name not in self.sums:
            n = x.shape[1]
            self.sums[name] = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            self.counts[name] = torch.zeros((), dtype=torch.int64, device=x.device)
        add_gram_(self.sums[name], x)
        if not torch.isfinite(self.sums[name].diagonal()).all():  # sums of x_i^2: NaN/Inf anywhere shows
            raise ValueError(f"NaN/Inf in the calibration activations entering {name}")
        self.counts[name] += x.shape[0]

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
        """{layer: C (n, n) float64}, C = (S + S.T) / (2 N); layers sharing an input share C."""
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


def init_layers(layers: dict, init: str, covariances: dict | None, generator: torch.Generator):
    """Start the given LoRALinears from nullspace.INITS[init], with one null basis per
    distinct covariance (q/k/v and gate/up read one input, so they share one eigh)."""
    bases = {}  # id(C) -> null basis
    for name, layer in layers.items():
        C = covariances[name] if init in nullspace.NEEDS_COVARIANCE else None
        W = layer.base.weight.detach()
        try:
            if init == "null":
                if id(C) not in bases:
                    bases[id(C)] = nullspace.null_basis(C.to(W.device), layer.r)
                A, B, W_res = nullspace.loranull_init(W, C, layer.r, layer.alpha, U_null=bases[id(C)])
            else:
                A, B, W_res = nullspace.INITS[init](W, C, layer.r, layer.alpha, generator=generator)
        except ValueError as e:
            raise ValueError(f"{init} init of {name}: {e}") from None
        layer.initialize(A, B, W_res)


def inject_blockwise(model: nn.Module, batches, targets=nullspace.ALL_TARGETS, *, r: int = 8,
                     alpha: float = 16, dropout: float = 0.0, init: str = "null",
                     freeze_A: bool = False, seed: int = 0, **calibration):
    """Calibrate and initialise the adapters block by block: (layers, covariances).

    The same adapters as `nullspace.inject_adapters(model, targets, r, alpha, dropout, init,
    covariances=calibrate(model, batches, targets), freeze_A=freeze_A, seed=seed)` (vanilla's
    random A included: layers draw in the same order from one generator), but each block is
    initialised as soon as its covariances are complete, so they can be dropped
    (keep_covariances=False) before the next block runs. **calibration: the keywords of
    calibrate_blockwise (dtype, keep_covariances, covariance_device, hidden_device, ...).
    """
    if init not in nullspace.INITS:
        raise ValueError(f"unknown init {init!r}; valid inits: {list(nullspace.INITS)}")
    names = lora.target_module_names(model, targets)  # module order, as inject_lora draws
    generator = torch.Generator().manual_seed(seed)
    layers = {}

    def init_block(i, covariances):
        block_layers = {name: lora.wrap_linear(model, name, r, alpha, dropout, freeze_A)
                        for name in names if name.startswith(f"layers.{i}.")}
        init_layers(block_layers, init, covariances, generator)
        layers.update(block_layers)

    covariances = calibrate_blockwise(model, batches, targets, init_block=init_block, **calibration)
    lora.mark_only_lora_trainable(model)
    return layers, covariances
