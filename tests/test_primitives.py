"""model.py's primitives against their formulas, without transformers: rotary embeddings on
hand-picked angles, RMSNorm with its epsilon, and grouped-query attention in both of its
branches (heads repeated, and SDPA's enable_gqa) against attention written out by hand."""
import math

import pytest
import torch

from model import Attention, RMSNorm, apply_rotary, repeat_kv, rotary_cos_sin
from tests.conftest import random_model, tiny_config


# ----------------------------------------------------------------------------- rotary
def test_rotary_angles_are_position_times_theta_to_the_minus_2i_over_hd():
    # head_dim 4, theta 100: pair i = (i, i + 2) turns by pos * 100^(-2i/4) = pos * (1, 1/10)
    cos, sin = rotary_cos_sin(torch.tensor([[0, 1, 3]]), head_dim=4, theta=100.0)
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [3.0, 0.3]])            # (T, hd/2)
    expected = torch.cat([angles, angles], dim=-1)[None]                    # rotate-half layout
    torch.testing.assert_close(cos, expected.cos())
    torch.testing.assert_close(sin, expected.sin())


def test_rotary_turns_each_pair_counterclockwise_by_its_angle():
    # x = (x0, x1 | x2, x3): pairs (x0, x2) and (x1, x3); at position 1 with theta 100 they turn
    # by 1 and 0.1 radian: (a, b) -> (a cos - b sin, a sin + b cos)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)                  # (B, heads, T, hd)
    cos, sin = rotary_cos_sin(torch.tensor([[1]]), head_dim=4, theta=100.0)
    y = apply_rotary(x, cos, sin).flatten()
    c0, s0, c1, s1 = math.cos(1.0), math.sin(1.0), math.cos(0.1), math.sin(0.1)
    expected = torch.tensor([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 1 * s0 + 3 * c0, 2 * s1 + 4 * c1])
    torch.testing.assert_close(y, expected)


def test_rotary_scores_depend_on_the_relative_position_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(pq, pk):
        cq, sq = rotary_cos_sin(torch.tensor([[pq]]), 8, 10000.0)
        ck, sk = rotary_cos_sin(torch.tensor([[pk]]), 8, 10000.0)
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


# ----------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_is_x_over_root_mean_square_plus_eps_times_weight():
    # inputs of size ~1e-3, so mean(x^2) ~ 1e-6 and eps = 1e-5 changes the result by a factor ~3
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.tensor([[1e-3, -2e-3, 3e-3, 0.5e-3]])
    rms = math.sqrt((1e-6 + 4e-6 + 9e-6 + 0.25e-6) / 4 + 1e-5)
    expected = torch.tensor([[1e-3 / rms, -4e-3 / rms, 1.5e-3 / rms, -0.5e-3 / rms]])
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- attention
def attention_by_hand(q, k, v, allowed):
    """softmax(q k^T / sqrt(hd) + mask) v, query head h reading key/value head h // n_rep.

    q (B, H, T, hd), k and v (B, Hkv, S, hd), allowed (B, T, S) bool."""
    B, H, T, hd = q.shape
    n_rep = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        kh, vh = k[:, h // n_rep], v[:, h // n_rep]                          # (B, S, hd)
        scores = q[:, h] @ kh.transpose(1, 2) / math.sqrt(hd)                # (B, T, S)
        out[:, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh
    return out


def test_repeat_kv_gives_query_head_h_the_kv_head_h_over_n_rep():
    kv = torch.arange(2 * 3).float().view(1, 3, 1, 2)                       # (B, Hkv=3, S, hd)
    repeated = repeat_kv(kv, 2)                                             # (B, 6, S, hd)
    for h in range(6):
        assert torch.equal(repeated[0, h], kv[0, h // 2])


@pytest.mark.parametrize("repeat", [True, False])
def test_both_attention_branches_equal_attention_by_hand_with_padding(repeat, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_heads=4, n_kv_heads=2)
    attention = Attention(config)
    monkeypatch.setattr("model.repeat_kv_heads", lambda mask, device: repeat)
    B, T = 2, 5
    x = torch.randn(B, T, config.dim)
    pad = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])  # left padding
    positions = (torch.cumsum(pad.long(), 1) - 1).clamp(min=0)
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (causal[None] & pad[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]
    y = attention(x, cos, sin, allowed[:, None])
    q = apply_rotary(attention.wq(x).view(B, T, 4, -1).transpose(1, 2), cos, sin)
    k = apply_rotary(attention.wk(x).view(B, T, 2, -1).transpose(1, 2), cos, sin)
    v = attention.wv(x).view(B, T, 2, -1).transpose(1, 2)
    by_hand = attention.wo(attention_by_hand(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-6)


def test_both_branches_give_the_same_padded_logits_and_cached_generation():
    from model import generate
    model = random_model(std=0.2)
    idx = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    pad = torch.ones_like(idx, dtype=torch.bool)
    pad[0, :4] = False
    results = {}
    for repeat in (True, False):
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            patch.setattr("model.repeat_kv_heads", lambda mask, device: repeat)
            logits = model(idx, pad_mask=pad)[0]
            results[repeat] = (logits[pad], generate(model, [[5, 6, 7], [8, 9]], 6))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert results[True][1] == results[False][1]


# ----------------------------------------------------------------------------- loss positions
def test_logits_at_the_loss_positions_give_the_full_paths_loss_and_gradients():
    """Training projects to the vocabulary only where the loss reads (the answer tokens)."""
    import nullspace
    from loranull_mini.data import Example, collate
    from model import masked_nll

    def loss_and_grads(selected: bool):
        model = random_model(std=0.1)
        layers = nullspace.inject_adapters(model, r=4, alpha=8, init="pissa")
        with torch.no_grad():
            for layer in layers.values():
                layer.B.add_(0.01)                        # B = B0 + 0.01: gradients reach A too
        g = torch.Generator().manual_seed(3)
        rows = [Example(torch.randint(1, 97, (n,), generator=g).tolist(), p) for n, p in ((12, 5), (9, 3), (15, 10))]
        b = collate(rows, pad_id=0)
        if selected:
            scored = (b["loss_mask"] > 0) & (b["targets"] != -100)
            logits, _ = model(b["idx"], pad_mask=b["pad_mask"], logits_at=scored)
            assert logits.shape == (int(scored.sum()), 97)
            total, count = masked_nll(logits[None], b["targets"][scored][None])
        else:
            logits, _ = model(b["idx"], pad_mask=b["pad_mask"])
            total, count = masked_nll(logits, b["targets"], b["loss_mask"])
        (total / count).backward()
        return float(total / count), {n: (l.A.grad.clone(), l.B.grad.clone()) for n, l in layers.items()}

    full_loss, full_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    for name, (dA, dB) in full_grads.items():
        assert dA.abs().max() > 0 and dB.abs().max() > 0
        torch.testing.assert_close(grads[name][0], dA, rtol=0, atol=1e-6)
        torch.testing.assert_close(grads[name][1], dB, rtol=0, atol=1e-6)
