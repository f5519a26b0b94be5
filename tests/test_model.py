"""Properties of model.py that do not need a reference implementation."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer, cut_at_stop, generate, masked_nll
from tests.conftest import random_model, tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3], [40, 41, 42, 43]]


def test_generation_with_kv_cache_equals_recomputation_greedy():
    model = random_model(std=0.3)
    cached = generate(model, PROMPTS, 20)
    recomputed = generate(model, PROMPTS, 20, use_cache=False)
    assert cached == recomputed
    assert len({tuple(o) for o in cached}) > 1 and len(set(cached[0])) > 1  # not a degenerate repeat


def test_generation_with_kv_cache_equals_recomputation_sampling():
    model = random_model(std=0.3)
    cached = generate(model, PROMPTS, 20, temperature=1.0, top_k=20,
                      generator=torch.Generator().manual_seed(1))
    recomputed = generate(model, PROMPTS, 20, temperature=1.0, top_k=20, use_cache=False,
                          generator=torch.Generator().manual_seed(1))
    assert cached == recomputed


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model = random_model(std=0.3)
    batched = generate(model, PROMPTS, 12)
    for prompt, out in zip(PROMPTS, batched):
        assert generate(model, [prompt], 12) == [out]


def test_left_padding_does_not_change_logits_of_real_tokens():
    model = random_model(std=0.3)
    x = torch.tensor([[7, 8, 9, 10]])
    padded = torch.tensor([[0, 0, 0, 7, 8, 9, 10]])
    pad_mask = torch.tensor([[False] * 3 + [True] * 4])
    ref, _ = model(x)
    out, _ = model(padded, pad_mask=pad_mask)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_stop_token_ends_a_row_and_is_not_returned():
    model = random_model(std=0.3)
    free = generate(model, [PROMPTS[0]], 10)[0]
    stop = free[4]
    first = free.index(stop)
    assert generate(model, [PROMPTS[0]], 10, stop_ids={stop})[0] == free[:first]


def test_stop_string_ends_a_row():
    class Chars:  # a toy tokenizer: id -> one character
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)
    model = random_model(std=0.3)
    free = generate(model, [PROMPTS[0]], 12)[0]
    text = Chars().decode(free)
    stop = text[5]
    out = generate(model, [PROMPTS[0]], 12, stop_strings=[stop], tokenizer=Chars())[0]
    assert out == free[:text.index(stop) + 1]
    assert cut_at_stop(Chars().decode(out), [stop]) == text[:text.index(stop)]


def test_loss_is_mean_nll_over_unmasked_targets():
    model = random_model()
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    loss_mask = torch.zeros(2, 9)
    loss_mask[:, 5:] = 1
    logits, loss = model(idx, targets, loss_mask)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, -logp[:, 5:].mean())
    # a masked target can be anything: changing it leaves the loss alone
    targets2 = targets.clone()
    targets2[:, :5] = (targets2[:, :5] + 1) % 97
    torch.testing.assert_close(model(idx, targets2, loss_mask)[1], loss)


def test_masked_nll_ignores_minus_100():
    logits = torch.randn(1, 3, 5)
    total, count = masked_nll(logits, torch.tensor([[1, -100, 2]]))
    assert count.item() == 2
    ref = -(torch.log_softmax(logits[0, 0], -1)[1] + torch.log_softmax(logits[0, 2], -1)[2])
    torch.testing.assert_close(total, ref)


def test_tied_output_shares_the_embedding_matrix():
    tied = Transformer(tiny_config(tie_embeddings=True))
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


def test_bfloat16_forward_is_close_to_float32():
    model = random_model()
    idx = torch.randint(0, 97, (2, 16))
    ref, _ = model(idx)
    half = random_model().to(torch.bfloat16)
    out, _ = half(idx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_config_and_overlong_input_are_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    model = random_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model, [list(range(64))], 5)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1], []])
