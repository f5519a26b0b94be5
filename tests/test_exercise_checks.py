"""Tests that check one exercise each (loranull_mini/exercises.py) without the code of the others.

Attention (exercise 2) runs here with rotary embeddings written out from their formula, and
the covariance hook (exercise 5) on a stand-in model of plain linear layers, so each passes
as soon as its own exercise is done, whatever the state of RMSNorm, rotary or attention.
"""
import math

import pytest
import torch
from torch import nn

import model
import nullspace
from model import Attention, KVCache
from tests.conftest import tiny_config
from tests.test_nullspace import gram, has_no_hooks, record_linear_inputs
from tests.test_primitives import attention_by_hand


# ----------------------------------------------------------------------------- exercise 2: attention
def rotary_by_formula(positions, head_dim, theta):
    """cos, sin (B, T, hd) of the angles pos * theta^(-2i/hd), each pair (i, i + hd/2) sharing one."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    angles = positions.double()[..., None] * theta ** (-2 * i / head_dim)             # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary_by_formula(x, cos, sin):
    """x (B, heads, T, hd): each pair (a, b) = (x_i, x_{i + hd/2}) -> (a cos - b sin, a sin + b cos)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]                                # (B, 1, T, hd/2)
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


@pytest.fixture
def rotary_from_formula(monkeypatch):
    """Attention.forward calls model.apply_rotary: here it is the formula above."""
    monkeypatch.setattr(model, "apply_rotary", apply_rotary_by_formula)


def projections(attention, x, cos, sin):
    """q (B, H, T, hd), k and v (B, Hkv, T, hd), q and k rotated, from the layer's own weights."""
    B, T, _ = x.shape
    heads = lambda y: y.view(B, T, -1, attention.head_dim).transpose(1, 2)  # noqa: E731
    return (apply_rotary_by_formula(heads(attention.wq(x)), cos, sin),
            apply_rotary_by_formula(heads(attention.wk(x)), cos, sin), heads(attention.wv(x)))


@pytest.mark.parametrize("repeat", [True, False])
def test_attention_equals_attention_by_hand_with_padding(repeat, rotary_from_formula, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_heads=4, n_kv_heads=2)
    attention = Attention(config)
    monkeypatch.setattr("model.repeat_kv_heads", lambda mask, device: repeat)
    B, T = 2, 5
    x = torch.randn(B, T, config.dim)
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])                  # left padding
    cos, sin = rotary_by_formula((torch.cumsum(pad.long(), 1) - 1).clamp(min=0), config.head_dim, config.rope_theta)
    allowed = (torch.ones(T, T, dtype=torch.bool).tril()[None] & pad[:, None, :]) | torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        y = attention(x, cos, sin, allowed[:, None])
        q, k, v = projections(attention, x, cos, sin)
        by_hand = attention.wo(attention_by_hand(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repeat", [True, False])
def test_attention_with_a_kv_cache_equals_one_pass_over_the_sequence(repeat, rotary_from_formula, monkeypatch):
    # a prompt of 4 tokens, then 3 tokens one at a time, into layer 1 of a 2-layer cache
    torch.manual_seed(0)
    config = tiny_config(n_heads=4, n_kv_heads=2, n_layers=2)
    attention = Attention(config)
    monkeypatch.setattr("model.repeat_kv_heads", lambda mask, device: repeat)
    B, T = 2, 7
    x = torch.randn(B, T, config.dim)
    cos, sin = rotary_by_formula(torch.arange(T).expand(B, T), config.head_dim, config.rope_theta)
    cache = KVCache(config, B, T, "cpu", torch.float32)
    outputs = []
    with torch.no_grad():
        whole = attention(x, cos, sin, None)                                           # plain causal attention
        for start, end in [(0, 4), (4, 5), (5, 6), (6, 7)]:
            q_slot = torch.arange(start, end)[:, None]
            mask = (torch.arange(end)[None, :] <= q_slot).expand(B, 1, end - start, end)   # (B, 1, T_new, S)
            outputs.append(attention(x[:, start:end], cos[:, start:end], sin[:, start:end], mask, cache, layer=1))
            cache.length += end - start                                                 # as Transformer.forward does
        q, k, v = projections(attention, x, cos, sin)
        causal = torch.ones(B, T, T, dtype=torch.bool).tril()
        by_hand = attention.wo(attention_by_hand(q, k, v, causal).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(whole, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.k[1], k, rtol=1e-5, atol=1e-6)                    # the rotated keys
    torch.testing.assert_close(cache.v[1], v, rtol=1e-5, atol=1e-6)
    assert cache.k[0].abs().max() == 0 and cache.v[0].abs().max() == 0                 # layer 0 untouched


def test_the_rotary_formula_here_is_model_py_s():
    # the stand-in above must be the same rotation as model.py's (on the real code)
    positions = torch.tensor([[0, 3, 11]])
    cos, sin = rotary_by_formula(positions, 8, 10000.0)
    x = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_rotary_by_formula(x, cos, sin), model.apply_rotary(x, cos, sin))
    torch.testing.assert_close((cos, sin), model.rotary_cos_sin(positions, 8, 10000.0))


# ----------------------------------------------------------------------------- exercise 5: covariances
class StandIn(nn.Module):
    """What collect_covariances uses of a Transformer, of plain linear layers: `layers`, the seven
    projections at their module paths (layers.i.attention.wq, ...), forward(idx, pad_mask=...)."""

    def __init__(self, vocab=50, dim=12, kv_dim=6, hidden=20, n_layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            block, block.attention, block.feed_forward = nn.Module(), nn.Module(), nn.Module()
            a, f = block.attention, block.feed_forward
            a.wq, a.wk, a.wv, a.wo = (nn.Linear(dim, dim), nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim),
                                      nn.Linear(dim, dim))
            f.w_gate, f.w_up, f.w_down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.layers.append(block)

    def forward(self, idx, pad_mask=None):
        h = self.embed(idx)                                                             # (B, T, dim)
        for block in self.layers:
            a, f = block.attention, block.feed_forward
            h = h + a.wo(torch.tanh(a.wq(h)) + torch.cat([a.wk(h), a.wv(h)], dim=-1))
            h = h + f.w_down(torch.sigmoid(f.w_gate(h)) * f.w_up(h))
        return h, None


def test_hook_covariance_is_the_gram_matrix_of_the_real_tokens():
    stand_in = StandIn()
    g = torch.Generator().manual_seed(1)
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[0, :4] = False                                                                 # left padding
    keep[2, 7:] = False                                                                 # right padding
    batches = [(torch.randint(0, 50, (3, 10), generator=g), keep), (torch.randint(0, 50, (2, 8), generator=g), None)]
    covariances = nullspace.collect_covariances(stand_in, batches)
    recorded = record_linear_inputs(stand_in, batches)                                  # real tokens only
    assert set(covariances) == set(recorded) and len(recorded) == 2 * 7
    for name, X in recorded.items():
        assert X.shape[0] == 30 - 4 - 3 + 16
        assert covariances[name].dtype == torch.float64
        torch.testing.assert_close(covariances[name], gram(X), rtol=1e-12, atol=1e-15)
        assert torch.equal(covariances[name], covariances[name].T)
    assert has_no_hooks(stand_in)


def test_covariance_divides_the_symmetrised_sum_by_the_token_count():
    S = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # not symmetric
    C = nullspace.covariance(S, 7, "layers.0.attention.wq")
    torch.testing.assert_close(C, (S + S.T) / 14, rtol=1e-15, atol=0)
    assert torch.equal(C, C.T)


def test_covariance_refuses_missing_tokens_and_nonfinite_sums_and_warns_when_rank_deficient():
    X = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no calibration tokens reached layers\.0\.attention\.wq"):
        nullspace.covariance(None, 0, "layers.0.attention.wq")
    S = X.T @ X
    S[2, 2] = math.inf
    with pytest.raises(ValueError, match=r"NaN/Inf.*layers\.1\.feed_forward\.w_up"):
        nullspace.covariance(S, 3, "layers.1.feed_forward.w_up")
    with pytest.warns(UserWarning, match="rank-deficient"):
        C = nullspace.covariance(X.T @ X, 3, "layers.0.attention.wo")                    # 3 tokens, 5 features
    torch.testing.assert_close(C, gram(X), rtol=1e-12, atol=0)
