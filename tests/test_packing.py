"""Packed (padding-free) batches: the same per-example logits, loss and gradients as the
right-padded layout."""
import pytest
import torch

from loranull_mini import data as datasets
from loranull_mini.toy import load_pretrained
from tests.conftest import random_model
from train import answer_nll_sum


def examples(lengths, n_prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [datasets.Example(torch.randint(1, 60, (n,), generator=g).tolist(), min(n_prompt, n - 1))
            for n in lengths]


LENGTHS = [12, 4, 7, 9, 3, 5, 11, 6]


def test_pack_places_every_token_once_in_the_fewest_nearly_even_rows():
    batch = datasets.pack(examples(LENGTHS), pad_id=0, max_len=16)
    tokens = sum(n - 1 for n in LENGTHS)                    # 49: at least 4 rows of 16
    assert batch["idx"].shape == (4, 13)                    # first-fit-decreasing would leave (4, 16)
    assert datasets.padding_fraction(batch) < 0.06 and int(batch["pad_mask"].sum()) == tokens
    for i, n in enumerate(LENGTHS):                         # each example: one contiguous run of n-1
        assert int((batch["segments"] == i).sum()) == n - 1
    assert torch.equal(batch["pad_mask"], batch["segments"] >= 0)
    padded = datasets.collate(examples(LENGTHS), pad_id=0, max_len=16)
    assert datasets.padding_fraction(batch) < datasets.padding_fraction(padded)
    assert float(batch["loss_mask"].sum()) == float(padded["loss_mask"].sum())


def packed_logits_per_example(model, exs, max_len):
    batch = datasets.pack(exs, 0, max_len)
    logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"], segments=batch["segments"])
    return [logits[batch["segments"] == i] for i in range(len(exs))]


def test_packed_logits_equal_each_example_run_alone():
    model = random_model(std=0.2).double()
    exs = examples(LENGTHS)
    packed = packed_logits_per_example(model, exs, 16)
    for e, got in zip(exs, packed):
        alone, _ = model(torch.tensor([e.ids[:-1]]))
        torch.testing.assert_close(got, alone[0], rtol=0, atol=1e-10)


def test_unrestarted_positions_or_leaking_segments_change_the_logits():
    """The check above must be able to fail: one segment id for a whole row (leak and no
    restart) gives different logits for the second example of a row."""
    model = random_model(std=0.2).double()
    exs = examples(LENGTHS)
    batch = datasets.pack(exs, 0, 16)
    leaky = torch.where(batch["segments"] >= 0, 0, -1)
    good, _ = model(batch["idx"], pad_mask=batch["pad_mask"], segments=batch["segments"])
    bad, _ = model(batch["idx"], pad_mask=batch["pad_mask"], segments=leaky)
    assert (good - bad).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["toy", "random"])
def test_packed_loss_and_gradients_equal_padded(which):
    model = (load_pretrained() if which == "toy" else random_model(std=0.2)).double()
    vocab = model.config.vocab_size
    exs = [datasets.Example([t % vocab for t in e.ids], e.n_prompt) for e in examples(LENGTHS)]
    results = []
    for build in (datasets.collate, datasets.pack):
        model.zero_grad()
        batch = build(exs, 0, 16)
        n = batch["loss_mask"][batch["targets"] != -100].sum()
        loss = answer_nll_sum(model, batch) / n
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (lp, gp), (lq, gq) = results
    torch.testing.assert_close(lq, lp, rtol=0, atol=1e-6)
    for a, b in zip(gp, gq):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_training_batch_packs_by_default_and_pads_when_asked():
    exs = examples(LENGTHS)
    assert "segments" in datasets.training_batch(exs, 0, 16)
    assert "segments" not in datasets.training_batch(exs, 0, 16, packed=False)


def test_packed_positions_restart_at_each_segment():
    """RoPE scores depend on position differences only, so isolated segments give the same
    logits with or without the restart (up to rounding); assert the positions themselves."""
    from model import packed_positions_and_mask
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    positions, mask = packed_positions_and_mask(segments, segments >= 0)
    assert positions[0, :6].tolist() == [0, 1, 2, 0, 1, 0]
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
