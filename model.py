"""A LLaMA-family decoder in plain PyTorch, written to be read top to bottom.

The architecture of LLaMA 2/3 and SmolLM2: token embedding -> n_layers x [RMSNorm ->
grouped-query attention with rotary embeddings -> residual, RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> output projection (optionally tied to the embedding).

Conventions used throughout the project:
- A linear layer computes y = x @ W.T with W of shape (out, in), as nn.Linear does.
- Rotary embeddings use the "rotate-half" layout of Hugging Face transformers: inside each
  head, dimension i is paired with dimension i + head_dim/2. Meta's and llama.cpp's files
  pair neighbours (2i, 2i+1) instead; the loaders in loranull_mini/checkpoint.py permute
  their q/k rows once at load time, so the model itself knows one layout only.
- q, k, v, o and the MLP's gate, up, down are separate nn.Linear modules, so LoRA can wrap
  each of them as a plain linear layer. PROJECTIONS names them.

Shapes: B batch, T new tokens, S key/value length (cache included), D dim, H heads,
Hkv key/value heads, hd head_dim, V vocabulary.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    dim: int = 576                # D, width of the residual stream
    n_layers: int = 30            # number of transformer blocks
    n_heads: int = 9              # H, query heads
    n_kv_heads: int = 3           # Hkv, key/value heads (grouped-query attention: H % Hkv == 0)
    vocab_size: int = 49152       # V
    hidden_dim: int = 1536        # width of the SwiGLU MLP
    norm_eps: float = 1e-5        # RMSNorm epsilon
    rope_theta: float = 100000.0  # rotary base (SmolLM2: 1e5; LLaMA-2: 1e4; LLaMA-3: 5e5)
    max_seq_len: int = 8192       # longest sequence the rotary table is built for
    tie_embeddings: bool = True   # output projection shares the token embedding matrix

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# The seven projections LoRA can target: short name -> module path inside a block.
PROJECTIONS = {
    "q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
    "gate": "feed_forward.w_gate", "up": "feed_forward.w_up", "down": "feed_forward.w_down",
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as LLaMA does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # exercise 1: RMSNorm and rotary embeddings
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
        # end exercise 1


# ----------------------------------------------------------------------------- rotary
def rotary_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin of the rotation angles, each (B, T, hd), for integer positions (B, T).

    Pair (i, i + hd/2) of a head is rotated by the angle pos * theta^(-2i/hd).
    """
    # exercise 1: RMSNorm and rotary embeddings
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq           # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                # (B, T, hd): rotate-half layout
    return angles.cos(), angles.sin()
    # end exercise 1


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    # exercise 1: RMSNorm and rotary embeddings
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
    # end exercise 1


def apply_rotary(x, cos, sin):
    """Rotate q or k, x (B, heads, T, hd), by the angles in cos/sin (B, T, hd)."""
    # exercise 1: RMSNorm and rotary embeddings
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin
    # end exercise 1


def repeat_kv(x, n_rep: int):
    """(B, Hkv, S, hd) -> (B, Hkv * n_rep, S, hd): each key/value head serves n_rep query heads."""
    # exercise 2: grouped-query attention and the KV cache
    if n_rep == 1:
        return x
    B, Hkv, S, hd = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, hd).reshape(B, Hkv * n_rep, S, hd)
    # end exercise 2


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated.

    All rows of a batch share slot indices (prompts are left-padded to one length);
    `valid` (B, max_len) marks which slots hold real tokens, `next_pos` (B,) is each row's
    next rotary position (padding does not advance it).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# ----------------------------------------------------------------------------- blocks
def repeat_kv_heads(mask, device) -> bool:
    """Grouped-query attention: SDPA can pair each key/value head with its n_rep query heads
    itself (enable_gqa), so k and v are not copied n_rep times. CUDA's kernels for an explicit
    mask lack that option: there the heads are repeated first (repeat_kv)."""
    return mask is not None and device.type != "cpu"


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        # exercise 2: grouped-query attention and the KV cache
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # write the new keys/values into their slots, read all so far
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]  # (B, Hkv, S, hd)
        repeat = repeat_kv_heads(mask, x.device)
        if repeat:
            n_rep = self.n_heads // self.n_kv_heads
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                          # (B, H, S, hd)
        # no mask (no padding, no cache): plain causal attention, the fast kernels
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=not repeat)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)           # (B, T, H*hd)
        return self.wo(y)
        # end exercise 2


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w_up = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w_down = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------- model
def masked_nll(logits, targets, loss_mask=None):
    """Summed next-token negative log-likelihood and the number of tokens it covers.

    logits (B, T, V); targets (B, T), already shifted (targets[:, t] follows idx[:, t]);
    positions with target -100 or loss_mask 0 are left out.
    """
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                          reduction="none").view_as(targets)                   # (B, T)
    weight = (targets != -100).float()
    if loss_mask is not None:
        weight = weight * loss_mask.float()
    return (nll * weight).sum(), weight.sum()


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2/nanoGPT init; only used for models trained from scratch (the toy preset, tests).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count with tied embeddings counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(self, idx, targets=None, loss_mask=None, *, pad_mask=None, cache: KVCache | None = None,
                logits_at=None, segments=None):
        """idx (B, T) token ids -> (logits (B, T, V) float32, mean loss or None).

        pad_mask (B, T) bool, True at real tokens: padded positions are never attended to and
        do not advance the rotary position (left padding for batched generation).
        cache: a KVCache; idx then holds the tokens that follow those already cached.
        segments (B, T) int: a packed row holds several sequences, one id each; rotary positions
        restart at 0 in each segment and no token attends to another segment (no cache).
        logits_at (B, T) bool: project to the vocabulary only at these positions and return
        their logits (N, V), in row-major order (no loss): on a large vocabulary the output
        layer is a fifth of the work, wasted at positions no loss reads.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if segments is not None:
            positions, mask = packed_positions_and_mask(segments, pad_mask)
        else:
            positions, mask = self._positions_and_mask(idx, pad_mask, cache)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

        h = self.tok_embeddings(idx)                                           # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        if logits_at is not None:
            return self.output(h[logits_at]).float(), None                     # (N, V)
        logits = self.output(h).float()                                        # (B, T, V)

        loss = None
        if targets is not None:
            total, count = masked_nll(logits, targets, loss_mask)
            loss = total / count.clamp(min=1)
        return logits, loss

    def _positions_and_mask(self, idx, pad_mask, cache):
        """Rotary positions (B, T) and the attention mask (B, 1, T, S) or None (plain causal)."""
        B, T = idx.shape
        device = idx.device
        if pad_mask is None:
            pad_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        elif pad_mask.shape != idx.shape:
            raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} != idx shape {tuple(idx.shape)}")
        pad_mask = pad_mask.bool()
        # position of a token = number of real tokens before it in its row
        offset = cache.next_pos[:, None] if cache is not None else 0
        positions = offset + torch.cumsum(pad_mask.long(), dim=1) - 1
        positions = positions.clamp(min=0)
        if cache is None and bool(pad_mask.all()):
            return positions, None
        start = cache.length if cache is not None else 0
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} slots, {start + T} needed")
            cache.valid[:, start:start + T] = pad_mask
            cache.next_pos += pad_mask.sum(dim=1)
            key_valid = cache.valid[:, :start + T]                             # (B, S)
        else:
            key_valid = pad_mask
        q_slot = torch.arange(start, start + T, device=device)[:, None]         # (T, 1)
        k_slot = torch.arange(start + T, device=device)[None, :]                # (1, S)
        mask = (k_slot <= q_slot)[None] & key_valid[:, None, :]                # (B, T, S)
        mask |= (k_slot == q_slot)[None]  # a padded query attends to itself: no empty rows, no NaN
        return positions, mask[:, None]                                         # (B, 1, T, S)


def packed_positions_and_mask(segments, pad_mask=None):
    """Rotary positions (B, T) and a block-diagonal causal mask (B, 1, T, T) for packed rows:
    segments (B, T) holds one id per sequence; a token sees earlier tokens of its own segment."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]                     # first token of a segment
    first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values
    positions = t - first                                                   # 0 at each segment's start
    same = segments[:, :, None] == segments[:, None, :]                     # (B, T, T)
    mask = same & (t[:, None, :] <= t[:, :, None])
    if pad_mask is not None:
        mask &= pad_mask.bool()[:, None, :]
    mask |= torch.eye(T, dtype=torch.bool, device=segments.device)[None]    # padding sees itself: no NaN
    return positions, mask[:, None]                                         # (B, 1, T, T)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, stop_ids=(), stop_strings=(),
             tokenizer=None, pad_id: int = 0, use_cache: bool = True,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue a batch of prompts (lists of token ids); returns the new ids of each.

    Prompts are left-padded to one length. temperature 0 is greedy; otherwise sample from
    softmax(logits / temperature), restricted to the top_k logits if given. A row stops at a
    token in stop_ids (not included in its output) or once its decoded text contains one of
    stop_strings (needs tokenizer; the ids that completed the string are kept: cut the text
    with `cut_at_stop`). use_cache=False recomputes the whole sequence every step (slow;
    a reference for the cached path).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    T0 = max(len(p) for p in prompts)
    if T0 >= model.config.max_seq_len:
        raise ValueError(f"a prompt of {T0} tokens leaves no room to generate within max_seq_len "
                         f"{model.config.max_seq_len}")
    param = next(model.parameters())
    idx, pad_mask = left_pad(prompts, pad_id, param.device)                 # (B, T0) each
    total = min(T0 + max_new_tokens, model.config.max_seq_len)
    cache = KVCache(model.config, len(prompts), total, param.device, param.dtype) if use_cache else None
    window = 4 * max(map(len, stop_strings), default=0)  # a stop string spans at most 4 tokens a character
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(total - T0):
        logits, _ = model(idx, pad_mask=pad_mask, cache=cache)
        new = _pick(logits[:, -1], temperature, top_k, generator)[:, None]      # (B, 1)
        for b, token in enumerate(new[:, 0].tolist()):
            if not done[b]:
                done[b] = token in stop_ids
                out[b] += [] if done[b] else [token]
                done[b] |= any(s in tokenizer.decode(out[b][-window:]) for s in stop_strings)  # the tail only
        if all(done):
            break
        step_mask = torch.ones_like(new, dtype=torch.bool)
        if use_cache:   # the cache holds the past: feed only the new token
            idx, pad_mask = new, step_mask
        else:           # no cache: the whole sequence again
            idx, pad_mask = torch.cat([idx, new], dim=1), torch.cat([pad_mask, step_mask], dim=1)
    return out


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, pad_mask) (B, T0): the prompts right-aligned, pad_mask True at real tokens."""
    T0 = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T0), pad_id, dtype=torch.long, device=device)
    pad_mask = torch.zeros(len(prompts), T0, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        pad_mask[b, T0 - len(p):] = True
    return idx, pad_mask


def _pick(logits, temperature, top_k, generator):
    """Next token per row from logits (B, V): argmax, or a sample at the given temperature."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop_strings=()) -> str:
    """Text up to (not including) the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]
