"""A NumPy-only port of the project's numerics, checked against tests/reference/ (test_numpy_port.py).

It shows that the reference vectors are enough to port the project: it rests only on the conventions in
tests/reference/manifest.json and docs/PORTING.md, computes in float64 and imports no torch:
RMSNorm, rotary (rotate-half), grouped-query attention with padding masks, SwiGLU, the tiny LLaMA's
forward with a KV cache, the input covariance over real tokens, every init (vanilla with a given A,
PiSSA, MiLoRA, CorDA-KPA, LoRA-Null, the controls top and space), the diagnostics, and one LoRA
training step. The backward of the training step is written by hand for the whole model (cross-entropy,
tied output, RMSNorm, SwiGLU, attention with rotary and GQA, the LoRA linears): each layer object keeps
what its forward saw and its `backward(dy)` returns d loss / d input, accumulating dA and dB.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REFERENCE = Path(__file__).resolve().parent / "reference"
PROJECTIONS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
               "gate": "feed_forward.w_gate", "up": "feed_forward.w_up", "down": "feed_forward.w_down"}


# ----------------------------------------------------------------------------- loading and comparing

def load_manifest(directory=REFERENCE) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())


def load_case(entry: dict, directory=REFERENCE) -> dict[str, np.ndarray]:
    """The tensors of a case, with those of the files it also loads (the tiny model's weights)."""
    tensors = {}
    for name in entry["also_load"] + [entry["file"]]:
        tensors.update(load_file(str(Path(directory) / name)))
    return tensors


def check(entry: dict, tensors: dict, name: str, actual) -> None:
    """Assert that `actual` matches output `name` of the case within the manifest's tolerances."""
    spec, ref = entry["outputs"][name], tensors[name]
    actual = np.asarray(actual)
    where = f"{entry['name']}: {name}"
    assert actual.shape == ref.shape, f"{where}: shape {actual.shape} != {ref.shape}"
    if ref.dtype.kind in "biu":
        np.testing.assert_array_equal(actual, ref, err_msg=where)
    else:
        np.testing.assert_allclose(np.asarray(actual, np.float64), ref.astype(np.float64),
                                   atol=spec["atol"], rtol=spec["rtol"], err_msg=where)


# ----------------------------------------------------------------------------- model pieces

def rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotary_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin (B, T, hd): pair (i, i + hd/2) turned by pos * theta^(-2i/hd) (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x, cos, sin):
    """x (B, heads, T, hd), cos/sin (B, T, hd)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def unrotate_grad(g, cos, sin):
    """The transpose of apply_rotary: d/dx of x*cos + rotate_half(x)*sin applied to g."""
    return g * cos[:, None] - rotate_half(g * sin[:, None])


def permute_interleaved_to_half(w, n_heads: int):
    """q/k rows of a Meta/GGUF file (pairs 2i, 2i+1) -> rotate-half rows (pairs i, i + hd/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class KVCache:
    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim):
        self.k = np.zeros((n_layers, batch, n_kv_heads, max_len, head_dim))
        self.v = np.zeros_like(self.k)
        self.valid = np.zeros((batch, max_len), bool)
        self.next_pos = np.zeros(batch, np.int64)
        self.length = 0


def positions_and_mask(pad_mask, cache: KVCache | None = None):
    """Rotary positions (B, T) and the boolean attention mask (B, 1, T, S); updates the cache's bookkeeping."""
    pad_mask = np.asarray(pad_mask, bool)
    B, T = pad_mask.shape
    offset = cache.next_pos[:, None] if cache is not None else 0
    positions = np.maximum(offset + np.cumsum(pad_mask, axis=1) - 1, 0).astype(np.int64)
    start = cache.length if cache is not None else 0
    if cache is not None:
        cache.valid[:, start:start + T] = pad_mask
        cache.next_pos = cache.next_pos + pad_mask.sum(axis=1)
        key_valid = cache.valid[:, :start + T]
    else:
        key_valid = pad_mask
    q_slot = np.arange(start, start + T)[:, None]
    k_slot = np.arange(start + T)[None, :]
    mask = (k_slot <= q_slot)[None] & key_valid[:, None, :]
    mask |= (k_slot == q_slot)[None]  # a padded query attends to itself
    return positions, mask[:, None]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def silu(x):
    return x / (1 + np.exp(-x))


# ----------------------------------------------------------------------------- layers with a backward

class Linear:
    """y = x @ W.T (+ s (x @ A.T) @ B.T with an adapter). backward accumulates dA, dB; W stays frozen."""

    def __init__(self, W, A=None, B=None, scaling=1.0, name="", record=None):
        self.W, self.A, self.B, self.s, self.name, self.record = W, A, B, scaling, name, record
        self.dA = None if A is None else np.zeros_like(A)
        self.dB = None if B is None else np.zeros_like(B)

    def __call__(self, x):
        self.x = x
        if self.record is not None:
            self.record.setdefault(self.name, []).append(x)
        y = x @ self.W.T
        if self.A is not None:
            self.u = x @ self.A.T                                   # (..., r)
            y = y + self.s * self.u @ self.B.T
        return y

    def backward(self, dy):
        dx = dy @ self.W
        if self.A is not None:
            flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (tokens, features)
            dy2, u2, x2 = flat(dy), flat(self.u), flat(self.x)
            self.dB += self.s * dy2.T @ u2                          # (m, r)
            du = self.s * dy @ self.B                               # (..., r)
            self.dA += du.reshape(-1, du.shape[-1]).T @ x2          # (r, n)
            dx = dx + du @ self.A
        return dx


class RMSNorm:
    def __init__(self, weight, eps):
        self.w, self.eps = weight, eps

    def __call__(self, x):
        self.x = x
        self.rinv = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.w * x * self.rinv

    def backward(self, dy):
        g = dy * self.w
        return self.rinv * g - self.x * self.rinv ** 3 * np.mean(g * self.x, axis=-1, keepdims=True)


class Attention:
    def __init__(self, wq, wk, wv, wo, n_heads, n_kv_heads):
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.H, self.Hkv = n_heads, n_kv_heads
        self.hd = wq.W.shape[0] // n_heads

    def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        q = self.wq(x).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T], cache.v[layer, :, :, start:start + T] = k, v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
        n_rep = H // Hkv
        kk, vv = np.repeat(k, n_rep, axis=1), np.repeat(v, n_rep, axis=1)   # query head h reads kv head h // n_rep
        scores = np.where(mask, q @ kk.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
        P = softmax(scores)
        y = P @ vv                                                         # (B, H, T, hd)
        self.saved = (q, kk, vv, P, cos, sin)
        return self.wo(y.transpose(0, 2, 1, 3).reshape(B, T, H * hd))

    def backward(self, dout):
        q, kk, vv, P, cos, sin = self.saved
        B, H, T, hd = q.shape
        S, n_rep = kk.shape[2], self.H // self.Hkv
        dy = self.wo.backward(dout).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        dP = dy @ vv.transpose(0, 1, 3, 2)
        dvv = P.transpose(0, 1, 3, 2) @ dy
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True)) / math.sqrt(hd)
        dq = dS @ kk
        dkk = dS.transpose(0, 1, 3, 2) @ q
        dk = dkk.reshape(B, self.Hkv, n_rep, S, hd).sum(axis=2)
        dv = dvv.reshape(B, self.Hkv, n_rep, S, hd).sum(axis=2)
        dq, dk = unrotate_grad(dq, cos, sin), unrotate_grad(dk, cos, sin)
        flat = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, -1)  # noqa: E731
        return self.wq.backward(flat(dq)) + self.wk.backward(flat(dk)) + self.wv.backward(flat(dv))


class FeedForward:
    def __init__(self, w_gate, w_up, w_down):
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def __call__(self, x):
        self.g, self.u = self.w_gate(x), self.w_up(x)
        return self.w_down(silu(self.g) * self.u)

    def backward(self, dy):
        dh = self.w_down.backward(dy)
        sig = 1 / (1 + np.exp(-self.g))
        dg = dh * self.u * sig * (1 + self.g * (1 - sig))
        return self.w_gate.backward(dg) + self.w_up.backward(dh * silu(self.g))


def attention_block(x, weights: dict, cos, sin, mask, n_heads, n_kv_heads):
    """One attention block from plain weight matrices (wq, wk, wv, wo)."""
    att = Attention(*(Linear(weights[n]) for n in ("wq", "wk", "wv", "wo")), n_heads, n_kv_heads)
    return att(x, cos, sin, mask)


def swiglu(x, w_gate, w_up, w_down):
    return FeedForward(Linear(w_gate), Linear(w_up), Linear(w_down))(x)


class TinyLlama:
    """The project's Transformer: embed -> n_layers x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> tied output.

    adapters: {layer name: (A, B, W_res)} replaces that layer's weight by W_res and adds s (x A^T) B^T.
    record: a dict that collects every linear layer's input by layer name (for the covariances).
    """

    def __init__(self, weights: dict, config: dict, adapters=None, scaling=1.0, record=None):
        self.c, self.w = config, weights
        adapters = adapters or {}
        self.linears = {}
        self.blocks = []
        for i in range(config["n_layers"]):
            lin = {}
            for short, path in PROJECTIONS.items():
                name = f"layers.{i}.{path}"
                A, B, W = adapters.get(name, (None, None, weights[f"{name}.weight"]))
                lin[short] = self.linears[name] = Linear(np.asarray(W, np.float64),
                                                         None if A is None else np.asarray(A, np.float64),
                                                         None if B is None else np.asarray(B, np.float64),
                                                         scaling, name, record)
            norm = lambda key: RMSNorm(weights[f"layers.{i}.{key}.weight"].astype(np.float64), config["norm_eps"])  # noqa: E731
            self.blocks.append((norm("attention_norm"),
                                Attention(lin["q"], lin["k"], lin["v"], lin["o"], config["n_heads"], config["n_kv_heads"]),
                                norm("ffn_norm"),
                                FeedForward(lin["gate"], lin["up"], lin["down"])))
        self.norm = RMSNorm(weights["norm.weight"].astype(np.float64), config["norm_eps"])
        self.E = weights["tok_embeddings.weight"].astype(np.float64)     # also the output weight (tied)

    def new_cache(self, batch, max_len):
        c = self.c
        return KVCache(c["n_layers"], batch, c["n_kv_heads"], max_len, c["dim"] // c["n_heads"])

    def __call__(self, idx, pad_mask=None, cache: KVCache | None = None):
        """Logits (B, T, V) for idx (B, T) (the tokens after those in the cache, if any)."""
        pad_mask = np.ones(idx.shape, bool) if pad_mask is None else pad_mask
        positions, mask = positions_and_mask(pad_mask, cache)
        cos, sin = rotary_cos_sin(positions, self.c["dim"] // self.c["n_heads"], self.c["rope_theta"])
        h = self.E[idx]
        for i, (norm1, att, norm2, ff) in enumerate(self.blocks):
            h = h + att(norm1(h), cos, sin, mask, cache, i)
            h = h + ff(norm2(h))
        if cache is not None:
            cache.length += idx.shape[1]
        return self.norm(h) @ self.E.T

    def backward(self, dlogits):
        """d loss / d (adapter A, B) of every layer, given d loss / d logits (B, T, V)."""
        dh = self.norm.backward(dlogits @ self.E)
        for norm1, att, norm2, ff in reversed(self.blocks):
            dh = dh + norm2.backward(ff.backward(dh))
            dh = dh + norm1.backward(att.backward(dh))
        return {name: (lin.dA, lin.dB) for name, lin in self.linears.items() if lin.A is not None}


def answer_loss(logits, targets, loss_mask):
    """Mean next-token NLL over targets != -100 with loss_mask 1, and d loss / d logits."""
    scored = (np.asarray(loss_mask) > 0) & (targets != -100)
    n = int(scored.sum())
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tgt = np.where(scored, targets, 0)
    nll = -np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    loss = float((nll * scored).sum() / n)
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, tgt[..., None], np.take_along_axis(dlogits, tgt[..., None], -1) - 1, -1)
    return loss, dlogits * scored[..., None] / n, n


def collate(examples, pad_id=0):
    """[(ids, n_prompt)] -> idx, targets, loss_mask, pad_mask (B, T): right-padded, targets = ids shifted by
    one (-100 at padding), loss_mask 1 on the answer targets (index n_prompt - 1 on)."""
    T = max(len(ids) for ids, _ in examples) - 1
    idx, targets = np.full((len(examples), T), pad_id, np.int64), np.full((len(examples), T), -100, np.int64)
    loss_mask, pad_mask = np.zeros((len(examples), T), np.float32), np.zeros((len(examples), T), bool)
    for b, (ids, n_prompt) in enumerate(examples):
        n = len(ids) - 1
        idx[b, :n], targets[b, :n], pad_mask[b, :n] = ids[:-1], ids[1:], True
        loss_mask[b, max(n_prompt - 1, 0):n] = 1.0
    return idx, targets, loss_mask, pad_mask


def train_step(weights, config, adapters, scaling, idx, targets, loss_mask, pad_mask):
    """loss, number of scored tokens, logits, {layer: (dA, dB)} of one LoRA step (no update)."""
    model = TinyLlama(weights, config, adapters, scaling)
    logits = model(idx, pad_mask)
    loss, dlogits, n = answer_loss(logits, targets, loss_mask)
    return loss, n, logits, model.backward(dlogits)


# ----------------------------------------------------------------------------- covariance

def covariance(batches) -> tuple[np.ndarray, int]:
    """C = X^T X / N over the real tokens of (activations (B, T, n), pad_mask (B, T)) batches, float64."""
    S, N = 0.0, 0
    for x, pad_mask in batches:
        X = np.asarray(x, np.float64)[np.asarray(pad_mask, bool)]      # (real tokens, n): padding never enters
        S, N = S + X.T @ X, N + len(X)
    return (S + S.T) / (2 * N), N


def model_covariances(weights, config, batches) -> dict[str, np.ndarray]:
    """The input covariance of every linear layer of the tiny model over (idx, pad_mask) batches."""
    record = {}
    model = TinyLlama(weights, config, record=record)
    for idx, pad_mask in batches:
        model(idx, pad_mask)
    return {name: covariance(zip(xs, (m for _, m in batches)))[0] for name, xs in record.items()}


# ----------------------------------------------------------------------------- inits: (A, B, W_res)

def vanilla_init(W, A):
    """A given (the project draws it Kaiming-uniform, bound 1/sqrt(n)), B = 0, W_res = W."""
    return A, np.zeros((W.shape[0], A.shape[0])), W.copy()


def _svd_split(W, r, alpha, keep):
    s = alpha / r
    U, S, Vh = np.linalg.svd(W, full_matrices=False)                     # S descending
    root = np.sqrt(S[keep] / s)
    A, B = root[:, None] * Vh[keep], U[:, keep] * root[None, :]
    return A, B, W - s * B @ A


def pissa_init(W, r, alpha):
    return _svd_split(W, r, alpha, slice(0, r))


def milora_init(W, r, alpha):
    return _svd_split(W, r, alpha, slice(-r, None))


def null_basis(C, r):
    return np.linalg.eigh(C)[1][:, :r]                                   # eigenvalues ascending


def top_basis(C, r):
    return np.linalg.eigh(C)[1][:, -r:]


def loranull_init(W, C, r, alpha):
    s = alpha / r
    U = null_basis(C, r)
    Uw, S, Qh = np.linalg.svd(W @ U, full_matrices=False)               # the small (m, r) SVD
    root = np.sqrt(S / s)
    A, B = root[:, None] * (Qh @ U.T), Uw * root[None, :]
    return A, B, W - s * B @ A


def damped_covariance(C, damp=0.01, tol=0.05, max_doublings=60):
    """C' = C + d mean(diag C) I for the first d = damp 2^k with ||C' inv(C') - I||_F < tol in float32."""
    scale, eye = np.trace(C) / len(C), np.eye(len(C))
    for _ in range(max_doublings):
        Cd = C + damp * scale * eye
        C32 = Cd.astype(np.float32)
        if np.linalg.norm(C32 @ np.linalg.inv(C32) - eye.astype(np.float32)) < tol:
            return Cd, damp
        damp *= 2
    raise ValueError("damping did not make the covariance invertible")


def corda_init(W, C, r, alpha):
    s = alpha / r
    Cd, _ = damped_covariance(C)
    U, S, Vh = np.linalg.svd(W @ Cd, full_matrices=False)
    Vp = np.linalg.solve(Cd, Vh.T)                                      # inv(C') V
    root = np.sqrt(S[-r:] / s)
    A, B = root[:, None] * Vp[:, -r:].T, U[:, -r:] * root[None, :]
    return A, B, W - s * B @ A


def top_space_init(W, C, r, alpha):
    return top_basis(C, r).T / math.sqrt(3), np.zeros((W.shape[0], r)), W.copy()


def space_only_init(W, C, r, alpha):
    return null_basis(C, r).T / math.sqrt(3), np.zeros((W.shape[0], r)), W.copy()


INITS = {"pissa": lambda W, C, r, a: pissa_init(W, r, a), "milora": lambda W, C, r, a: milora_init(W, r, a),
         "corda": corda_init, "null": loranull_init, "top": top_space_init, "space": space_only_init}


# ----------------------------------------------------------------------------- diagnostics

def row_space_basis(A):
    _, S, Vh = np.linalg.svd(A, full_matrices=False)
    return Vh[S > S.max() * max(A.shape) * np.finfo(np.float64).eps]


def projector(A):
    """P (n, n) onto the row space of A (r, n): sign- and basis-invariant."""
    V = row_space_basis(A)
    return V.T @ V


def captured_energy(A, C):
    V = row_space_basis(A)
    return float(np.trace(V @ C @ V.T) / np.trace(C))


def output_energy(W, C):
    return float(((W @ C) * W).sum())


def knowledge_disturbance(F, G, C, energy):
    return math.sqrt(max(float(((F.T @ F) * (G @ C @ G.T)).sum()), 0.0) / energy)


def effective_rank(sv) -> dict:
    sv = np.asarray(sv, np.float64).ravel()
    p = sv[sv > 0] / sv.sum()
    share = np.cumsum(np.sort(sv ** 2)[::-1]) / (sv ** 2).sum()
    count = lambda q: min(int((share < q - 1e-12).sum()) + 1, sv.size)  # noqa: E731
    return {"erank": math.exp(-(p * np.log(p)).sum()), "n90": count(0.90), "n99": count(0.99)}


def activation_singular_values(C):
    return np.sqrt(np.clip(np.linalg.eigvalsh(C), 0, None))[::-1]
