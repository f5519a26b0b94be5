#!/usr/bin/env python
"""Reference vectors for ports of this project: python tests/reference/make_reference.py [--out DIR]

Writes one safetensors file per case and manifest.json (what each case checks, the tensors,
their shapes and dtypes, the tolerances a port should meet, the conventions) into
tests/reference/ or DIR. The inputs are drawn with numpy's PCG64,
`numpy.random.Generator(numpy.random.PCG64(seed))`, one stated seed per case, and stored in
the files: a port loads them and never needs to reproduce the draws. The outputs are computed
by this project's torch code (model.py, lora.py, nullspace.py, the loss of train.py), on one
thread, so a rerun on the same machine writes the same bytes (tests/test_reference.py checks).

The model cases run in float32 (the project's RMSNorm, rotary table and logits are float32);
the covariance, init and diagnostic cases in float64, except PiSSA/MiLoRA, whose SVD the
project takes in float32.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from torch import nn  # noqa: E402

import lora  # noqa: E402
import nullspace as ns  # noqa: E402
import train  # noqa: E402
from loranull_mini.checkpoint import permute_half_to_interleaved, permute_interleaved_to_half  # noqa: E402
from loranull_mini.data import Example, collate  # noqa: E402
from model import (PROJECTIONS, Attention, FeedForward, KVCache, ModelConfig, RMSNorm,  # noqa: E402
                   Transformer, apply_rotary, rotary_cos_sin)

FORMAT = 1
TINY = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=19, hidden_dim=32, norm_eps=1e-5,
            rope_theta=10000.0, max_seq_len=32, tie_embeddings=True)
WEIGHTS_FILE = "tiny_model_weights.safetensors"
INIT_NAMES = ("vanilla", "pissa", "milora", "corda", "null", "top", "space")
COV_INITS = ("corda", "null", "top", "space")

CONVENTIONS = {
    "compare": "elementwise |port - ref| <= atol + rtol * |ref| (numpy.allclose); integer tensors exactly",
    "inputs": "drawn with numpy.random.Generator(numpy.random.PCG64(seed)) (seed per case) or a stated closed "
              "form, and stored in the files: load them, do not redraw them",
    "linear": "W is (out, in) and a linear layer computes y = x @ W.T (torch.nn.Linear)",
    "lora": "y = x @ W_res.T + s * (x @ A.T) @ B.T with A (r, in), B (out, r), s = alpha / r; every init "
            "satisfies W_res + s * B @ A = W",
    "rotary": "rotate-half layout (Hugging Face): in each head, dimension i is paired with i + head_dim/2 and "
              "turned by the angle pos * theta^(-2i/head_dim), i < head_dim/2; "
              "rotate_half(x) = concat(-x2, x1); x_rot = x * cos + rotate_half(x) * sin, cos/sin of the angles "
              "repeated twice along the last axis. Meta/GGUF files store q/k rows interleaved (pair 2i, 2i+1): "
              "permute their rows per head (case qk_permutation)",
    "gqa": "query head h reads key/value head h // (n_heads / n_kv_heads)",
    "attention": "scores q k^T / sqrt(head_dim), masked entries -inf, softmax over keys; the mask is causal "
                 "and hides padded keys; a padded query attends to itself only (no empty softmax row)",
    "padding": "pad_mask is True at real tokens. Model cases are left-padded (generation); the training batch "
               "is right-padded (targets -100 there). A token's rotary position is the number of real tokens "
               "before it in its row (padded tokens get 0 and do not advance it). Padded tokens never enter a "
               "covariance",
    "covariance": "C = X^T X / N over the real (non-padded) tokens of all batches, accumulated in float64 and "
                  "symmetrised (S + S^T) / (2N); the plain token average, NOT the reference code's per-sample "
                  "signed-max normalisation x / x.max().abs()",
    "eigh": "eigenvalues ascending (numpy.linalg.eigh, torch.linalg.eigh); null basis = first r columns, "
            "top basis = last r columns",
    "svd": "singular values descending; PiSSA takes the first r triplets, MiLoRA and CorDA-KPA the last r",
    "signs": "singular vectors and eigenvectors have arbitrary signs (and, within a cluster of equal "
             "eigenvalues, an arbitrary basis): compare s*B@A, W_res, the projector P_A onto A's row space "
             "and the singular values of A and B, never A or B themselves",
    "loss": "mean next-token cross-entropy over the scored positions only: targets != -100 and loss_mask 1 "
            "(the answer tokens); targets[t] is the token that follows idx[t]",
    "float": "init/covariance/diagnostic cases float64 (port in float64); model cases float32 (a float64 "
             "port meets their tolerances)",
}


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def arr(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, order="C")  # a copy, C order, 0-d stays 0-d


class Case:
    """One reference case: its tensors and its manifest entry."""

    def __init__(self, name: str, checks: str, seed, dtype: str, also_load=(), params=None, notes=""):
        self.name, self.checks, self.seed, self.dtype = name, checks, seed, dtype
        self.also_load, self.params, self.notes = list(also_load), params or {}, notes
        self.tensors, self.inputs, self.outputs = {}, {}, {}

    def inp(self, name, value):
        a = arr(value)
        self.tensors[name] = a
        self.inputs[name] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        return a

    def out(self, name, value, atol: float, rtol: float = 0.0):
        a = arr(value)
        self.tensors[name] = a
        exact = a.dtype.kind in "biu"
        self.outputs[name] = {"shape": list(a.shape), "dtype": str(a.dtype),  # 2 digits: the same on any machine
                              "atol": 0 if exact else float(f"{atol:.2g}"), "rtol": 0 if exact else rtol}
        return a

    def entry(self) -> dict:
        e = {"name": self.name, "file": f"{self.name}.safetensors", "checks": self.checks, "dtype": self.dtype,
             "seed": self.seed, "also_load": self.also_load, "params": self.params,
             "inputs": dict(sorted(self.inputs.items())), "outputs": dict(sorted(self.outputs.items()))}
        if self.notes:
            e["notes"] = self.notes
        return e


# ----------------------------------------------------------------------------- helpers

def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY)


def projector(A: torch.Tensor) -> torch.Tensor:
    """P (n, n) onto the row space of A (r, n), float64, from A's right singular vectors."""
    _, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    basis = Vh[S > S.max() * max(A.shape) * torch.finfo(torch.float64).eps]  # the rank rule of captured_energy
    return basis.T @ basis


def tiny_weights() -> dict[str, np.ndarray]:
    """The tiny model's weights (float32): embeddings N(0, 0.5^2), linears N(0, 1/in), norms 1 + N(0, 0.2^2)."""
    g, c = rng(5), tiny_config()
    w = {"tok_embeddings.weight": 0.5 * g.standard_normal((c.vocab_size, c.dim))}
    shapes = {"attention.wq": (c.dim, c.dim), "attention.wk": (c.n_kv_heads * c.head_dim, c.dim),
              "attention.wv": (c.n_kv_heads * c.head_dim, c.dim), "attention.wo": (c.dim, c.dim),
              "feed_forward.w_gate": (c.hidden_dim, c.dim), "feed_forward.w_up": (c.hidden_dim, c.dim),
              "feed_forward.w_down": (c.dim, c.hidden_dim)}
    for i in range(c.n_layers):
        w[f"layers.{i}.attention_norm.weight"] = 1 + 0.2 * g.standard_normal(c.dim)
        w[f"layers.{i}.ffn_norm.weight"] = 1 + 0.2 * g.standard_normal(c.dim)
        for name, shape in shapes.items():
            w[f"layers.{i}.{name}.weight"] = g.standard_normal(shape) / math.sqrt(shape[1])
    w["norm.weight"] = 1 + 0.2 * g.standard_normal(c.dim)
    return {k: v.astype(np.float32) for k, v in w.items()}


def tiny_model(weights) -> Transformer:
    model = Transformer(tiny_config())
    state = {k: t(v) for k, v in weights.items()}
    state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state)
    return model.eval()


def left_padded_batch():
    """idx (3, 7) int64 left-padded with id 0 (2 and 3 pads in rows 1, 2), pad_mask True at real tokens."""
    g = rng(5_000)
    idx = g.integers(1, TINY["vocab_size"], size=(3, 7)).astype(np.int64)
    pad_mask = np.ones((3, 7), dtype=bool)
    pad_mask[1, :2] = False
    pad_mask[2, :3] = False
    idx[~pad_mask] = 0
    return idx, pad_mask


def training_examples():
    """Three examples (prompt + answer token ids, n_prompt): ids (3, 8) int64 padded with -1, n_prompt (3,)."""
    g = rng(6_000)
    lengths, n_prompt = [8, 6, 5], [4, 3, 3]  # tokens per example, prompt tokens among them
    ids = np.full((3, max(lengths)), -1, np.int64)
    for b, n_tok in enumerate(lengths):
        ids[b, :n_tok] = g.integers(1, TINY["vocab_size"], size=n_tok)
    return ids, np.array(n_prompt, np.int64)


def right_padded_batch():
    """The training batch as train.py builds it (loranull_mini.data.collate, pad id 0): right-padded,
    targets shifted by one and -100 at padding, loss_mask 1 on the answer targets only."""
    ids, n_prompt = training_examples()
    examples = [Example([int(i) for i in row if i >= 0], int(n)) for row, n in zip(ids, n_prompt)]
    batch = collate(examples, pad_id=0)
    return tuple(arr(batch[k]) for k in ("idx", "targets", "loss_mask", "pad_mask"))


class FixedActivations(nn.Module):
    """A stand-in model for collect_covariances: its one target layer (layers.0.attention.wq) reads
    fixed float64 activations; a batch is (index of the activation block, pad_mask)."""

    def __init__(self, blocks):
        super().__init__()
        n = blocks[0].shape[-1]
        block = nn.Module()
        block.attention = nn.Module()
        block.attention.wq = nn.Linear(n, 1, bias=False).double()
        self.layers = nn.ModuleList([block])
        self.blocks = [t(b) for b in blocks]

    def forward(self, idx, pad_mask=None):
        return self.layers[0].attention.wq(self.blocks[int(idx.flatten()[0])])


# ----------------------------------------------------------------------------- model cases

def case_rmsnorm():
    c = Case("rmsnorm", "RMSNorm y = x / sqrt(mean(x^2) + eps) * weight over the last axis", 1, "float32",
             params={"eps": 1e-5})
    g = rng(1)
    x = c.inp("x", (g.standard_normal((2, 3, 16)) * np.array([[[1.0]], [[0.01]]])).astype(np.float32))
    w = c.inp("weight", (1 + 0.2 * g.standard_normal(16)).astype(np.float32))
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(t(w))
        c.out("y", norm(t(x)), atol=1e-6, rtol=1e-5)
    return c


def case_rotary():
    hd, theta, H, Hkv = 8, 10000.0, 4, 2
    c = Case("rotary", "rotary cos/sin for given positions (rotate-half layout) and their application to q and k",
             2, "float32", params={"head_dim": hd, "theta": theta},
             notes="cos, sin (B, T, head_dim): the angle of pair i sits at columns i and i + head_dim/2; "
                   "q (B, H, T, hd), k (B, Hkv, T, hd) are rotated by the same cos/sin of their token.")
    g = rng(2)
    pos = c.inp("positions", np.array([[0, 1, 2, 3, 4], [0, 0, 1, 17, 40]], np.int64))
    q = c.inp("q", g.standard_normal((2, H, 5, hd)).astype(np.float32))
    k = c.inp("k", g.standard_normal((2, Hkv, 5, hd)).astype(np.float32))
    cos, sin = rotary_cos_sin(t(pos), hd, theta)
    c.out("cos", cos, atol=2e-5)
    c.out("sin", sin, atol=2e-5)
    c.out("q_rot", apply_rotary(t(q), cos, sin), atol=5e-5, rtol=1e-5)
    c.out("k_rot", apply_rotary(t(k), cos, sin), atol=5e-5, rtol=1e-5)
    return c


def case_attention():
    cfg = tiny_config()
    c = Case("attention_gqa", "one attention block: q/k/v projections, rotary, grouped-query attention "
             "(4 query heads, 2 key/value heads) with a causal + left-padding mask, output projection",
             3, "float32", params={"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                                   "head_dim": cfg.head_dim, "theta": cfg.rope_theta},
             notes="positions and mask (B, 1, T, S) are outputs of the padding rule (check them) and may be used "
                   "as given. y is compared at every position, padded ones included (a padded query attends "
                   "to itself only).")
    g = rng(3)
    x = c.inp("x", g.standard_normal((2, 6, cfg.dim)).astype(np.float32))
    pad = np.ones((2, 6), bool)
    pad[1, :2] = False
    pad = c.inp("pad_mask", pad)
    att = Attention(cfg)
    ws = {}
    for name in ("wq", "wk", "wv", "wo"):
        lin = getattr(att, name)
        ws[name] = c.inp(name, (g.standard_normal(lin.weight.shape) / math.sqrt(lin.weight.shape[1])).astype(np.float32))
        with torch.no_grad():
            lin.weight.copy_(t(ws[name]))
    positions, mask = Transformer._positions_and_mask(None, t(pad), t(pad), None)
    c.out("positions", positions, atol=0)
    c.out("mask", mask, atol=0)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        c.out("y", att(t(x), cos, sin, mask), atol=2e-5, rtol=1e-5)
    return c


def case_swiglu():
    cfg = tiny_config()
    c = Case("swiglu", "SwiGLU MLP y = w_down(silu(w_gate x) * w_up x)", 4, "float32",
             params={"dim": cfg.dim, "hidden_dim": cfg.hidden_dim})
    g = rng(4)
    x = c.inp("x", g.standard_normal((2, 5, cfg.dim)).astype(np.float32))
    ff = FeedForward(cfg)
    for name in ("w_gate", "w_up", "w_down"):
        lin = getattr(ff, name)
        w = c.inp(name, (g.standard_normal(lin.weight.shape) / math.sqrt(lin.weight.shape[1])).astype(np.float32))
        with torch.no_grad():
            lin.weight.copy_(t(w))
    with torch.no_grad():
        c.out("y", ff(t(x)), atol=2e-5, rtol=1e-5)
    return c


def case_tiny_model(weights):
    c = Case("tiny_model", "full logits of a tiny LLaMA (2 layers, GQA, SwiGLU, tied embeddings) on a "
             "left-padded batch", {"weights": 5, "idx": 5000}, "float32", also_load=[WEIGHTS_FILE], params={"config": TINY},
             notes=f"weights: {WEIGHTS_FILE} with this project's names (model.py); output.weight is tied to "
                   "tok_embeddings.weight and not stored. Logits at padded positions follow the attention rule "
                   "(a padded query attends to itself); a port that ignores them compares where pad_mask is True.")
    idx, pad = left_padded_batch()
    c.inp("idx", idx)
    c.inp("pad_mask", pad)
    model = tiny_model(weights)
    positions, _ = Transformer._positions_and_mask(None, t(idx), t(pad), None)
    c.out("positions", positions, atol=0)
    with torch.no_grad():
        logits, _ = model(t(idx), pad_mask=t(pad))
    c.out("logits", logits, atol=1e-4, rtol=1e-4)
    return c


def case_kv_cache(weights):
    c = Case("kv_cache_decode", "KV-cache decoding equals the full forward: prefill of 4 left-padded tokens, "
             "then a chunk of 2 tokens, then 1 token", {"weights": 5, "idx": 5000}, "float32", also_load=[WEIGHTS_FILE],
             params={"config": TINY, "chunks": [[0, 4], [4, 6], [6, 7]], "cache_slots": 7},
             notes="Feed idx[:, a:b] for each chunk [a, b) in order, pad_mask[:, a:b] with it (the padding is all "
                   "in the first chunk); the cache keeps keys after rotary, a valid flag per slot and each row's "
                   "next rotary position (real tokens so far). logits_cached (B, 7, V) concatenates the chunks' "
                   "logits; compare it with this case's logits_cached and with tiny_model's logits.")
    idx, pad = left_padded_batch()
    c.inp("idx", idx)
    c.inp("pad_mask", pad)
    model = tiny_model(weights)
    cache = KVCache(model.config, 3, 7, "cpu", torch.float32)
    parts = []
    with torch.no_grad():
        for a, b in ((0, 4), (4, 6), (6, 7)):
            logits, _ = model(t(idx[:, a:b]), pad_mask=t(pad[:, a:b]), cache=cache)
            parts.append(logits)
    c.out("logits_cached", torch.cat(parts, 1), atol=1e-4, rtol=1e-4)
    c.out("next_pos", cache.next_pos, atol=0)
    return c


def case_qk_permutation(weights):
    cfg = tiny_config()
    c = Case("qk_permutation", "the q/k row permutation from Meta/GGUF files (interleaved rotary pairs) to this "
             "project's rotate-half layout", None, "float32",
             params={"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim},
             notes="wq_interleaved, wk_interleaved: the tiny model's layer-0 wq, wk as a Meta/GGUF file stores them. "
                   "Inside each head, interleaved row 2i + j (j = 0, 1) becomes rotate-half row i + j * head_dim/2: "
                   "view (heads, hd/2, 2, in), swap the middle axes, reshape back. wq_half, wk_half are the results "
                   "(= layers.0.attention.wq/wk.weight of the weights file); rows_half_from_interleaved[k] is the "
                   "interleaved row that lands at rotate-half row k of a head-major (dim, in) matrix.")
    wq_int = c.inp("wq_interleaved", permute_half_to_interleaved(t(weights["layers.0.attention.wq.weight"]), cfg.n_heads))
    wk_int = c.inp("wk_interleaved", permute_half_to_interleaved(t(weights["layers.0.attention.wk.weight"]),
                                                                 cfg.n_kv_heads))
    c.out("wq_half", permute_interleaved_to_half(t(wq_int), cfg.n_heads), atol=0)
    c.out("wk_half", permute_interleaved_to_half(t(wk_int), cfg.n_kv_heads), atol=0)
    rows = torch.arange(cfg.dim, dtype=torch.float64)[:, None]
    c.out("rows_half_from_interleaved", permute_interleaved_to_half(rows, cfg.n_heads).flatten().to(torch.int64), atol=0)
    return c


# ----------------------------------------------------------------------------- covariance cases

def case_covariance():
    c = Case("covariance_hook", "the covariance a forward hook must produce: C = X^T X / N over the real tokens "
             "of two batches of fixed activations with padding (padded rows hold large values: they must not count)",
             7, "float64", params={"layer": "layers.0.attention.wq"},
             notes="batch 1: x1 (2, 5, 8) with pad_mask1; batch 2: x2 (1, 4, 8) with pad_mask2. N = the number of "
                   "True entries in both masks (stored as n_tokens).")
    g = rng(7)
    x1 = g.standard_normal((2, 5, 8)) * np.geomspace(1, 1e-3, 8)
    x2 = g.standard_normal((1, 4, 8)) * np.geomspace(1, 1e-3, 8)
    m1 = np.ones((2, 5), bool)
    m1[0, 3:] = False  # right padding
    m1[1, :1] = False  # left padding
    m2 = np.ones((1, 4), bool)
    m2[0, :2] = False
    x1[~m1], x2[~m2] = 1e3, -1e3
    c.inp("x1", x1), c.inp("pad_mask1", m1), c.inp("x2", x2), c.inp("pad_mask2", m2)
    model = FixedActivations([x1, x2])
    C = ns.collect_covariances(model, [(torch.tensor([0]), t(m1)), (torch.tensor([1]), t(m2))], targets=("q",))
    c.out("C", C["layers.0.attention.wq"], atol=1e-15, rtol=1e-12)
    c.out("n_tokens", np.array(int(m1.sum() + m2.sum()), np.int64), atol=0)
    return c


def case_covariance_model(weights):
    c = Case("covariance_tiny_model", "collect_covariances on the tiny model over two padded batches: the input "
             "covariance of every target layer (q, k, v read the attention-norm output; gate, up the MLP-norm "
             "output), padded tokens left out", {"weights": 5, "idx1": 5000, "idx2": 6000},
             "float64 (of float32 activations)", also_load=[WEIGHTS_FILE],
             params={"config": TINY},
             notes="batch 1: idx1, pad_mask1 (left-padded, tiny_model's batch); batch 2: idx2, pad_mask2 "
                   "(right-padded, lora_train_step's batch). N = 32 real tokens. C.<layer name> (n, n) float64 "
                   "for the 14 layers layers.{0,1}.attention.{wq,wk,wv,wo}, layers.{0,1}.feed_forward.{w_gate,"
                   "w_up,w_down}.")
    idx1, pad1 = left_padded_batch()
    idx2, _, _, pad2 = right_padded_batch()
    c.inp("idx1", idx1), c.inp("pad_mask1", pad1), c.inp("idx2", idx2), c.inp("pad_mask2", pad2)
    model = tiny_model(weights)
    C = ns.collect_covariances(model, [(t(idx1), t(pad1)), (t(idx2), t(pad2))])
    for name in sorted(C):
        scale = float(C[name].diagonal().max())
        c.out(f"C.{name}", C[name], atol=2e-5 * scale, rtol=1e-5)
    return c


# ----------------------------------------------------------------------------- inits

def init_outputs(c: Case, name: str, A, B, W_res, W, C, s: float, atol: float, energy: float):
    A, B = A.double(), B.double()
    c.out(f"{name}.sBA", s * B @ A, atol=atol)
    c.out(f"{name}.W_res", W_res, atol=atol)
    c.out(f"{name}.P_A", projector(A), atol=atol)
    c.out(f"{name}.sv_A", torch.linalg.svdvals(A), atol=atol)
    c.out(f"{name}.sv_B", torch.linalg.svdvals(B), atol=atol)
    if C is not None:
        c.out(f"{name}.captured_energy", np.array(ns.captured_energy(A, C)), atol=atol)
        c.out(f"{name}.disturbance", np.array(ns.knowledge_disturbance(s * B, A, C, energy)), atol=atol)


def init_case(name, seed, W, C, r, alpha, inits, checks, notes, vanilla_A=None):
    dtype = "float64" + (" (PiSSA/MiLoRA: the project's float32 SVD)" if "pissa" in inits else "")
    c = Case(name, checks, seed, dtype,
             params={"r": r, "alpha": alpha, "scaling": alpha / r, "inits": list(inits)}, notes=notes)
    W, C = t(c.inp("W", W)), t(c.inp("C", C))
    s = alpha / r
    energy = ns.output_energy(W, C)
    c.out("eigvals_C", torch.linalg.eigvalsh(C), atol=1e-13, rtol=1e-9)
    c.out("sv_W", torch.linalg.svdvals(W), atol=1e-12)
    c.out("output_energy", np.array(energy), atol=1e-12, rtol=1e-10)
    for init in inits:
        if init == "vanilla":
            A = t(c.inp("vanilla.A", vanilla_A))
            B, W_res = torch.zeros(W.shape[0], r, dtype=torch.float64), W.clone()
        else:
            A, B, W_res = ns.INITS[init](W, C, r, alpha)
        atol = 2e-5 if init in ("pissa", "milora") else 1e-9
        init_outputs(c, init, A, B, W_res, W, C, s, atol, energy)
        if init == "corda":
            C_damped, damp = ns.damped_covariance(C)
            c.out("corda.damp", np.array(damp), atol=0)
            c.out("corda.C_damped", C_damped, atol=1e-14, rtol=1e-12)
            c.out("corda.sv_WC", torch.linalg.svdvals(W @ C_damped), atol=1e-10, rtol=1e-9)
    return c


def case_inits():
    m, n, r, alpha = 12, 10, 3, 6.0
    g = rng(8)
    W = g.standard_normal((m, n)) / math.sqrt(n)
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    X = g.standard_normal((40, n)) * np.geomspace(1, 1e-3, n) @ Q.T
    C = X.T @ X / len(X)
    C = (C + C.T) / 2
    A_vanilla = g.uniform(-1, 1, size=(r, n)) / math.sqrt(n)
    return init_case(
        "inits", 8, W, C, r, alpha, INIT_NAMES,
        "every init on one (W, C, r, alpha) with s = alpha / r = 2, in sign-invariant form: s*B@A, W_res, the "
        "projector P_A onto A's row space, the singular values of A and B (how sqrt(S/s) is split between "
        "them), the captured energy trace(P_A C)/trace(C) and the disturbance ||s B A X^T|| / ||W X^T||",
        "C = X^T X / 40 of X (40, 10) with column scales geomspace(1, 1e-3) rotated by a random orthogonal Q; "
        "its eigenvalues are well separated at both cuts. vanilla: A is given (vanilla.A, uniform in "
        "+-1/sqrt(n)), B = 0, W_res = W. For null, top and space P_A is U U^T of the eigenvector basis. "
        "PiSSA/MiLoRA: the project takes the SVD of W in float32, hence their looser tolerance.",
        vanilla_A=A_vanilla)


def case_inits_degenerate():
    m, n, r, alpha = 12, 10, 4, 4.0
    g = rng(9)
    W = g.standard_normal((m, n)) / math.sqrt(n)
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    lam = np.array([1e-4 * (1 + k * 1e-10) for k in range(4)] + [1e-2, 3e-2, 0.1, 0.3, 1.0, 2.0])
    C = (Q * lam) @ Q.T
    C = (C + C.T) / 2
    return init_case(
        "inits_degenerate", 9, W, C, r, alpha, COV_INITS,
        "the covariance-based inits when the r = 4 smallest eigenvalues of C form a cluster of nearly equal "
        "values (1e-4 * (1 + k 1e-10), k = 0..3): the individual eigenvectors are not defined, the subspace is",
        "C = Q diag(lam) Q^T, lam = [1e-4 (1 + k 1e-10) for k < 4] + [1e-2, 3e-2, 0.1, 0.3, 1, 2]; r = 4 takes the "
        "whole cluster, so the cut (1e-4 | 1e-2) does not split it and U U^T, s*B@A, W_res are well defined while "
        "the 4 eigenvectors are any orthonormal basis of the cluster's span. Compare projectors, never U.")


# ----------------------------------------------------------------------------- diagnostics

def case_diagnostics():
    c = Case("diagnostics", "knowledge_disturbance, output_energy, captured_energy (a full-rank and a "
             "rank-deficient A), effective rank (erank, n90, n99) of weight, activation and given singular values",
             10, "float64",
             notes="energy = trace(W C W^T); disturbance = sqrt(trace(dW C dW^T) / energy) for dW = F @ G. "
                   "captured_energy(A) = trace(P_A C) / trace(C) with P_A onto A's TRUE row space (A_deficient's "
                   "third row is the sum of the first two: rank 2). erank = exp(-sum p log p), p = sv / sum(sv), "
                   "zeros skipped; nXX = the fewest components (sv sorted descending) whose share of sum(sv^2) "
                   "reaches XX% (share >= q - 1e-12). sv_tie = [3, 1]: share [0.9, 1.0], n90 = 1. "
                   "Activation singular values: sqrt of C's eigenvalues clamped at 0, descending.")
    g = rng(10)
    m, n, k = 9, 7, 2
    W = t(c.inp("W", g.standard_normal((m, n)) / math.sqrt(n)))
    X = g.standard_normal((30, n)) * np.geomspace(1, 1e-2, n)
    C = t(c.inp("C", (X.T @ X / 30 + (X.T @ X / 30).T) / 2))
    F = t(c.inp("F", g.standard_normal((m, k))))
    G = t(c.inp("G", g.standard_normal((k, n)) * 0.1))
    A = g.standard_normal((3, n))
    A_def = A.copy()
    A_def[2] = A[0] + A[1]
    A, A_def = t(c.inp("A_full", A)), t(c.inp("A_deficient", A_def))
    sv_tie = t(c.inp("sv_tie", np.array([3.0, 1.0])))
    sv_zeros = t(c.inp("sv_zeros", np.array([4.0, 0.0, 2.0, 1.0, 0.0, 0.5])))
    energy = ns.output_energy(W, C)
    c.out("output_energy", np.array(energy), atol=1e-14, rtol=1e-12)
    c.out("disturbance", np.array(ns.knowledge_disturbance(F, G, C, energy)), atol=1e-14, rtol=1e-12)
    c.out("captured_energy_full", np.array(ns.captured_energy(A, C)), atol=1e-13)
    c.out("captured_energy_deficient", np.array(ns.captured_energy(A_def, C)), atol=1e-13)
    svs = {"weight": ns.weight_singular_values(W), "activation": ns.activation_singular_values(C),
           "tie": sv_tie, "zeros": sv_zeros}
    for name, sv in svs.items():
        if name in ("weight", "activation"):
            c.out(f"sv_{name}", sv, atol=1e-13, rtol=1e-10)
        e = ns.effective_rank(sv)
        c.out(f"erank_{name}", np.array(e["erank"]), atol=1e-12, rtol=1e-12)
        c.out(f"n90_{name}", np.array(e["n90"], np.int64), atol=0)
        c.out(f"n99_{name}", np.array(e["n99"], np.int64), atol=0)
    return c


def case_lora_linear():
    r, alpha = 3, 6.0
    c = Case("lora_linear", "the LoRA layer's forward y = x W_res^T + (alpha / r) (x A^T) B^T with B != 0",
             11, "float32", params={"r": r, "alpha": alpha, "scaling": alpha / r})
    g = rng(11)
    x = c.inp("x", g.standard_normal((2, 3, 10)).astype(np.float32))
    W_res = c.inp("W_res", (g.standard_normal((12, 10)) / math.sqrt(10)).astype(np.float32))
    A = c.inp("A", g.uniform(-1, 1, size=(r, 10)).astype(np.float32) / np.float32(math.sqrt(10)))
    B = c.inp("B", (0.5 * g.standard_normal((12, r))).astype(np.float32))
    layer = lora.LoRALinear(nn.Linear(10, 12, bias=False), r=r, alpha=alpha)
    with torch.no_grad():
        layer.base.weight.copy_(t(W_res))
        layer.A.copy_(t(A))
        layer.B.copy_(t(B))
        c.out("y", layer(t(x)), atol=1e-5, rtol=1e-5)
    return c


# ----------------------------------------------------------------------------- one training step

def case_train_step(weights):
    r, alpha = 2, 4.0
    s = alpha / r
    c = Case("lora_train_step", "one LoRA training step on the tiny model with adapters on all 7 projections of "
             "both layers: the loss on the answer tokens only and the gradients of every A and B",
             {"weights": 5, "batch": 6000, "adapters": 6}, "float32", also_load=[WEIGHTS_FILE],
             params={"config": TINY, "r": r, "alpha": alpha, "scaling": s},
             notes="Layer <name> (e.g. layers.0.attention.wq) computes x @ W_res.T + s (x @ A.T) @ B.T with "
                   "<name>.W_res, <name>.A, <name>.B (W_res = W - s B A, so the model starts equal to the tiny "
                   "model); every other weight from the weights file, frozen. The batch: example_ids (3, 8), -1 after "
                   "each example's end, its first n_prompt tokens the prompt; collated right-padded with pad id 0 into "
                   "idx = ids[:-1], targets = ids[1:] (-100 at padding), pad_mask, loss_mask = 1 on the targets from "
                   "index n_prompt - 1 on (the answer tokens); these four are outputs to check and the inputs of the "
                   "step. loss = sum of next-token NLL where loss_mask = 1 and targets != -100, divided by that "
                   "count (n_scored). grad.<name>.A, grad.<name>.B: d loss / d A, B.")
    g = rng(6)
    ids, n_prompt = training_examples()
    c.inp("example_ids", ids)
    c.inp("n_prompt", n_prompt)
    idx, targets, loss_mask, pad = right_padded_batch()
    for name, value in (("idx", idx), ("targets", targets), ("loss_mask", loss_mask), ("pad_mask", pad)):
        c.out(name, value, atol=0)
    model = tiny_model(weights)
    layers = {}
    for name in lora.target_module_names(model, tuple(PROJECTIONS)):
        layer = lora.wrap_linear(model, name, r, alpha)
        m, n = layer.base.weight.shape
        A = t(c.inp(f"{name}.A", (g.uniform(-1, 1, size=(r, n)) / math.sqrt(n)).astype(np.float32)))
        B = t(c.inp(f"{name}.B", (0.3 * g.standard_normal((m, r))).astype(np.float32)))
        layer.initialize(A, B, lora.residual_weight(layer.base.weight, A, B, s))
        c.inp(f"{name}.W_res", layer.base.weight)
        layers[name] = layer
    lora.mark_only_lora_trainable(model)
    model.train()
    batch = {"idx": t(idx), "targets": t(targets), "loss_mask": t(loss_mask), "pad_mask": t(pad)}
    total = train.answer_nll_sum(model, batch)                            # the training step's loss
    count = ((batch["loss_mask"] > 0) & (batch["targets"] != -100)).sum()
    loss = total / count
    loss.backward()
    c.out("loss", loss, atol=1e-5, rtol=1e-5)
    c.out("n_scored", count.to(torch.int64), atol=0)
    with torch.no_grad():
        full, _ = model(t(idx), pad_mask=t(pad))
    c.out("logits", full, atol=1e-4, rtol=1e-4)
    for name, layer in sorted(layers.items()):
        for p in ("A", "B"):
            grad = getattr(layer, p).grad
            c.out(f"grad.{name}.{p}", grad, atol=2e-6 + 1e-4 * float(grad.abs().max()), rtol=1e-4)
    return c


# ----------------------------------------------------------------------------- writing

def to_json(obj, indent: str = "") -> str:
    """JSON with short dicts and lists of plain values (a tensor description) on one line; keys in the order built."""
    plain = lambda v: not isinstance(v, (dict, list)) or (isinstance(v, list) and all(map(plain, v)))  # noqa: E731
    short = plain(list(obj.values()) if isinstance(obj, dict) else obj) and len(json.dumps(obj)) <= 200
    if isinstance(obj, dict) and obj and not short:
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and obj and not short:
        inner = indent + " "
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, sort_keys=True)



def build() -> tuple[list[Case], dict[str, np.ndarray]]:
    weights = tiny_weights()
    cases = [case_rmsnorm(), case_rotary(), case_attention(), case_swiglu(), case_tiny_model(weights),
             case_kv_cache(weights), case_qk_permutation(weights), case_covariance(), case_covariance_model(weights),
             case_inits(), case_inits_degenerate(), case_diagnostics(), case_lora_linear(),
             case_train_step(weights)]
    return cases, weights


def main(out: str | Path = HERE) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reductions, the same bits, on every rerun
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # module constructors draw weights that are overwritten at once
            cases, weights = build()
    finally:
        torch.set_num_threads(threads)
    save_file({k: weights[k] for k in sorted(weights)}, str(out / WEIGHTS_FILE))
    for c in cases:
        save_file({k: c.tensors[k] for k in sorted(c.tensors)}, str(out / f"{c.name}.safetensors"))
    manifest = {
        "format": FORMAT,
        "generator": "tests/reference/make_reference.py (python tests/reference/make_reference.py)",
        "conventions": CONVENTIONS,
        "shared_files": {WEIGHTS_FILE: {
            "what": "the tiny model's weights, float32, this project's tensor names; output.weight is tied to "
                    "tok_embeddings.weight (not stored)",
            "seed": 5, "config": TINY,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(weights.items())}}},
        "cases": [c.entry() for c in cases],
    }
    (out / "manifest.json").write_text(to_json(manifest) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE), help="directory to write (default: tests/reference)")
    print(f"wrote {main(parser.parse_args().out)}")
