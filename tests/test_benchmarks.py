"""PIQA, SIQA and OpenBookQA scored as lm-eval-harness scores them: acc, acc_norm, option KL."""
import math
import re

import pytest

from loranull_mini import data as datasets
from loranull_mini import answers, metrics


def test_acc_and_acc_norm_pick_different_options_on_a_hand_built_item():
    # option 0: 2 tokens, -3 in all over 4 characters; option 1: 3 tokens, -4.5 over 30 characters
    logprobs = [[-1.0, -2.0], [-1.5, -1.5, -1.5]]
    options = ["abcd", "a much longer option, 30 chars"]
    assert len(options[1]) == 30
    sums = [sum(lp) for lp in logprobs]
    assert metrics.choice_accuracy(sums, options, label=0) == (True, False)   # sum: -3 > -4.5
    assert metrics.choice_accuracy(sums, options, label=1) == (False, True)   # per char: -0.15 > -0.75


def test_option_kl_by_hand():
    base = metrics.option_distributions([[[math.log(0.5)], [math.log(0.25)], [math.log(0.25)]]])[0]
    tuned = metrics.option_distributions([[[math.log(0.25)], [math.log(0.5)], [math.log(0.25)]]])[0]
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    assert metrics.categorical_kl(base, tuned) == pytest.approx(by_hand, abs=1e-12)
    assert metrics.categorical_kl(base, base) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name, n_options, prefix", [("piqa", 2, "Question: "), ("siqa", 3, "Q: "), ("obqa", 4, "")])
def test_benchmark_items_have_lm_eval_prompts_and_a_gold_label(name, n_options, prefix):
    items = datasets.benchmark(name, 50)
    assert len(items) == 50
    assert len({r["context"] for r in items}) == 50
    for r in items:
        assert len(r["options"]) == n_options and all(o and not o[:3] in ("A. ", "B. ") for o in r["options"])
        assert 0 <= r["label"] < n_options and r["context"].startswith(prefix)
    assert len({r["label"] for r in items}) > 1  # the gold is not always the same position
    if name != "obqa":
        assert items[0]["context"].endswith("\nAnswer:" if name == "piqa" else "\nA:")


def test_an_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark"):
        datasets.benchmark("hellaswag", 5)


def test_the_wikipedia_probe_scores_body_tokens_and_never_the_title():
    from loranull_mini import assets
    from loranull_mini.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(assets.default_model_path())
    examples = datasets.wiki_body(tok, 20, 64)
    passages = datasets.wiki_passages(datasets.WIKI_HELDOUT)
    batch = datasets.collate(examples, tok.pad_id)
    for b, e in enumerate(examples):
        scored = batch["targets"][b][(batch["loss_mask"][b] > 0) & (batch["targets"][b] != -100)].tolist()
        assert len(scored) == 64 and scored == e.ids[e.n_prompt:]
        title = tok.decode(e.ids[:e.n_prompt])
        assert title.endswith(" --")
        passage = next(p for p in passages if p.startswith(title[:-3] + " -- "))
        body = " " + passage.partition(" -- ")[2]
        assert body.startswith(tok.decode(scored))  # what is scored is the body, from its first token


def test_every_numeric_distractor_is_a_number_different_from_the_gold():
    rows = datasets.asdiv("test")
    built = answers.asdiv_numeric_choices(rows)
    assert len(built) > len(rows) // 2
    for r in built:
        gold = metrics.parse_number(r["number"])
        assert len(r["options"]) == 4 and len(set(r["options"])) == 4 and r["options"][0] == r["answer"]
        for o in r["options"][1:]:
            number, _, rest = o.partition(" ")
            assert not metrics.same_number(metrics.parse_number(number), gold)
            assert rest == r["answer"].partition(" ")[2]
    # 2 + 2 is the gold; 2 - 2 = 0 is built from the problem; the gold's neighbour 5 fills the third
    assert answers.numeric_distractors("2 apples and 2 pears", 4.0) == [2.0, 0.0, 5.0]
    assert answers.asdiv_numeric_choices([{"question": "Is 3 more than 2?", "answer": "Yes", "number": "Yes"}]) == []


def test_the_digit_split_adds_up_to_the_answer_loss():
    import torch
    from loranull_mini.data import Example
    from loranull_mini.tokenizer import Tokenizer
    from loranull_mini import assets
    from tests.conftest import random_model
    tok = Tokenizer.from_gguf(assets.default_model_path())
    model = random_model(vocab_size=49152, max_seq_len=512)
    examples = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in datasets.asdiv("test")[:6]]
    with torch.no_grad():
        logprobs = metrics.answer_logprobs(model, examples)
        nll, tokens = metrics.answer_nll(model, examples)
    split = metrics.digit_split(tok, examples, logprobs)
    for i in range(len(examples)):
        assert split["digit_nll"][i] + split["other_nll"][i] == pytest.approx(nll[i], rel=1e-9)
        assert split["digit_tokens"][i] + split["other_tokens"][i] == tokens[i]
        assert split["other_tokens"][i] >= 1  # at least <|im_end|>
    digits = [bool(re.search(r"\d", r["answer"])) for r in datasets.asdiv("test")[:6]]
    assert [n > 0 for n in split["digit_tokens"]] == digits and any(digits) and not all(digits)
