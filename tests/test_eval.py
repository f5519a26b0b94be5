"""eval.py: the scorers on hand-made cases, likelihoods against hand computations, the lr
rule, merged vs unmerged evaluation, and the toy suite end to end."""
import json
import math
import time

import pytest
import torch

import eval as ev
import lora
import nullspace
from conftest import random_model
from loranull_mini import metrics, toy
from loranull_mini.data import Example
from model import Transformer


# ----------------------------------------------------------------------------- text scorers
def test_nq_scorer_ignores_case_punctuation_and_articles_and_accepts_any_alias():
    assert metrics.normalize_answer("The Beatles!") == "beatles"
    assert metrics.normalize_answer("  An   apple, the PIE. ") == "apple pie"
    assert metrics.normalize_answer("Theatre of the Absurd") == "theatre of absurd"   # "the" inside a word stays
    assert metrics.normalize_answer("U.S.") == "us"
    assert metrics.exact_match(" the Beatles.", ["Beatles"])
    assert metrics.exact_match("a Paris", ["Paris"])
    assert metrics.exact_match("Abominable Snowman", ["Yeti", "The Abominable Snowman"])  # second alias
    assert not metrics.exact_match("Paris, France", ["Paris"])                             # extra words
    assert not metrics.exact_match("", ["Paris"])


def test_math_extractor_takes_the_first_number_of_an_answer():
    assert metrics.extract_number("29 dollars") == 29.0
    assert metrics.extract_number("She has -3.5 apples, then 4.") == -3.5
    assert metrics.extract_number("3,750 people") == 3750.0
    assert metrics.extract_number("1/2 of the cake") == 0.5
    assert metrics.extract_number("no number here") is None
    # gold answers: only a text that is exactly one number counts
    assert metrics.parse_number("-1/3") == pytest.approx(-1 / 3)
    assert metrics.parse_number("14:10") is None and metrics.parse_number("Jim") is None
    assert metrics.same_number(metrics.extract_number("17 popsicles"), metrics.parse_number("17"))
    assert not metrics.same_number(metrics.extract_number("16 popsicles"), 17.0)
    assert not metrics.same_number(None, 17.0)


def test_retention_counts_only_items_the_reference_got_right():
    assert metrics.retention([True, False, True, False], [True, True, False, False]) == (0.5, 2)
    value, n = metrics.retention([True, False], [False, False])
    assert math.isnan(value) and n == 0


def test_paired_difference_is_the_difference_of_token_weighted_means():
    nll, ref, counts = [10.0, 30.0, 8.0], [9.0, 27.0, 8.5], [5, 10, 4]
    delta, se = metrics.paired_nll_difference(nll, ref, counts)
    assert delta == pytest.approx(sum(nll) / sum(counts) - sum(ref) / sum(counts))
    # equal lengths: the usual standard error of a mean of per-text differences
    d = [0.3, -0.1, 0.2, 0.0]
    delta, se = metrics.paired_nll_difference([x * 10 for x in d], [0.0] * 4, [10] * 4)
    m, sd = metrics.mean_std(d)
    assert delta == pytest.approx(m) and se == pytest.approx(sd / 2)


# ----------------------------------------------------------------------------- likelihoods
class Chars:
    """A character tokenizer over the tiny model's 97 ids."""
    pad_id = 0

    def encode(self, text):
        return [1 + ord(c) % 96 for c in text]


class ForcedModel(Transformer):
    """A tiny model whose next-token distribution always favours one token."""

    def __init__(self, config, favourite: int):
        super().__init__(config)
        self.favourite = favourite

    def forward(self, *args, **kwargs):
        logits, loss = super().forward(*args, **kwargs)
        logits = logits.clone()
        logits[..., self.favourite] += 20.0
        return logits, loss


def forced_model(favourite):
    base = random_model()
    model = ForcedModel(base.config, favourite)
    model.load_state_dict(base.state_dict())
    return model.eval()


def test_option_likelihood_picks_the_answer_the_model_is_forced_to_give():
    tok = Chars()
    item = {"question": "Which?", "options": ["A", "B"], "answer": 1}
    model = forced_model(tok.encode("B")[0])
    assert ev.run_mmlu(model, tok, [item])["scores"]["mmlu_acc"] == 1.0
    assert ev.run_mmlu(model, tok, [{**item, "answer": 0}])["scores"]["mmlu_acc"] == 0.0
    # the numbers, by hand: log-softmax of the full sequence at the option's positions
    prompt = tok.encode("Question: Which?\nAnswer:")
    (lp_a, lp_b), = metrics.option_logprobs(model, [prompt], [[tok.encode(" A"), tok.encode(" B")]])
    for option, lp in ((" A", lp_a), (" B", lp_b)):
        ids = prompt + tok.encode(option)
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
        by_hand = [float(logp[len(prompt) - 1 + t, ids[len(prompt) + t]]) for t in range(len(option))]
        assert lp == pytest.approx(by_hand, abs=1e-4)
    assert lp_b[1] > -1e-3 > lp_a[1]                   # B is near certain, A is not


def test_shared_prefix_scoring_equals_scoring_every_sequence_in_full():
    model = random_model(std=0.2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 9, 5)]
    options = [[torch.randint(1, 97, (n,), generator=g).tolist() for n in lens] for lens in ((1, 4), (2,), (6, 1, 3))]
    shared = metrics.option_logprobs(model, prompts, options, batch_size=2, option_batch=3)
    examples = [Example(p + o, len(p)) for p, opts in zip(prompts, options) for o in opts]
    nll, count = metrics.sequence_nll(model, examples, pad_id=0, batch_size=2)
    flat = [lp for opts in shared for lp in opts]
    assert [len(lp) for lp in flat] == count
    assert [-sum(lp) for lp in flat] == pytest.approx(nll, abs=1e-4)
    answer_nll, answer_count = metrics.answer_nll(model, examples)
    assert answer_nll == pytest.approx(nll, abs=1e-4) and answer_count == count


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = random_model(std=0.2)
    g = torch.Generator().manual_seed(1)
    passages = [Example(torch.randint(1, 97, (n,), generator=g).tolist(), 1) for n in (7, 20, 12)]
    total, count = 0.0, 0
    for p in passages:                                 # by hand: every token but the first
        with torch.no_grad():
            logp = model(torch.tensor([p.ids]))[0][0].log_softmax(-1)
        total -= sum(float(logp[t - 1, p.ids[t]]) for t in range(1, len(p.ids)))
        count += len(p.ids) - 1
    scores = ev.run_wiki(model, Chars(), passages)["scores"]
    assert scores["wiki_nll"] == pytest.approx(total / count, rel=1e-5)
    assert scores["wiki_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


# ----------------------------------------------------------------------------- the lr rule
def test_lr_rule_takes_the_lowest_mean_validation_loss_ties_to_the_smaller_lr():
    runs = [{"lr": 1e-3, "val_loss": 1.0}, {"lr": 1e-3, "val_loss": 2.0},    # mean 1.5
            {"lr": 3e-3, "val_loss": 1.2}, {"lr": 3e-3, "val_loss": 1.4},    # mean 1.3
            {"lr": 1e-2, "val_loss": 0.5}, {"lr": 1e-2, "val_loss": float("inf")}]  # a diverged seed
    lr, grid = ev.select_lr(runs, (1e-3, 3e-3, 1e-2))
    assert lr == 3e-3 and grid[1e-3][0] == pytest.approx(1.5) and grid[1e-2][2] == 2
    tie = [{"lr": 1e-2, "val_loss": 1.0}, {"lr": 1e-3, "val_loss": 1.0}]
    assert ev.select_lr(tie, (1e-2, 1e-3))[0] == 1e-3


# ----------------------------------------------------------------------------- whole models
def test_merged_model_evaluates_like_base_plus_adapter():
    model, tok = toy.load_toy_model(log=lambda *a: None)
    nullspace.inject_adapters(model, r=4, alpha=8, init="pissa")
    with torch.no_grad():                               # a trained-looking adapter
        g = torch.Generator().manual_seed(0)
        for layer in lora.lora_layers(model).values():
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g))
    prep = ev.prepare_toy(tok)
    unmerged = ev.evaluate(model, tok, prep)
    lora.merge_lora(model)
    merged = ev.evaluate(model, tok, prep)
    assert unmerged["items"] == merged["items"]
    for key, value in unmerged["scores"].items():
        assert merged["scores"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert unmerged["scores"]["fact_acc"] < 1.0         # the adapter really changed the model


def test_toy_suite_reports_every_method_with_finite_numbers(tmp_path):
    out = tmp_path / "toy"
    t0 = time.time()
    results = ev.main(["--suite", "toy", "--out", str(out)])
    elapsed = time.time() - t0
    rows = {r["method"]: r for r in results["table"]}
    assert list(rows) == ["base"] + list(ev.METHODS)
    for method, row in rows.items():
        for key, _, _, _ in ev.TOY_COLUMNS:
            assert math.isfinite(row[key][0]) and math.isfinite(row[key][1]), (method, key)
        assert row["n_seeds"] == (1 if method == "base" else 3)
    assert rows["base"]["fact_retention"][0] == 1.0            # by construction of the metric
    assert all(0 <= rows[m]["fact_retention"][0] <= 1 for m in ev.METHODS)
    table = (out / "results.md").read_text()
    assert all(ev.LABELS[m] in table for m in rows)
    assert json.loads((out / "results.json").read_text())["selected"].keys() == set(ev.METHODS)
    for plot in ("tradeoff", "effective_rank", "spectra", "energy", "disturbance"):
        assert (out / f"{plot}.png").stat().st_size > 1000
    # every grid point was trained and recorded, and the suite resumes from its files
    assert len(list((out / "runs").glob("*/*/run.json"))) == 6 * 3 * 3
    t1 = time.time()
    again = ev.main(["--suite", "toy", "--out", str(out)])
    assert again["table"] == results["table"]
    assert time.time() - t1 < elapsed / 3
