"""eval.py and its machinery: the scorers on hand-made cases, KL and NLL change by hand,
likelihoods against hand computations, typed distractors, the matched-loss curve and the
bootstrap, the learning-rate rules, merged vs unmerged evaluation, and a small study end to end."""
import copy
import json
import math
import time

import numpy as np
import pytest
import torch

import eval as ev
import lora
import nullspace
from conftest import random_model
from loranull_mini import answers, data, metrics, stats, suite, toy
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
    d = [0.3, -0.1, 0.2, 0.0]
    delta, se = metrics.paired_nll_difference([x * 10 for x in d], [0.0] * 4, [10] * 4)
    m, sd = metrics.mean_std(d)
    assert delta == pytest.approx(m) and se == pytest.approx(sd / 2)


# ----------------------------------------------------------------------------- KL and NLL by hand
class TableModel(torch.nn.Module):
    """A 'model' over a 3-token vocabulary whose next-token logits at position t are row t of a table."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, idx, targets=None, loss_mask=None, *, pad_mask=None, cache=None):
        return self.table[: idx.shape[1]][None].expand(idx.shape[0], -1, -1), None


def test_kl_and_nll_change_by_hand_on_a_three_token_example():
    # tokens [0, 2, 1]: the positions 0 and 1 are scored (they predict 2, then 1)
    base = TableModel([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    tuned = TableModel([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    example = [Example([0, 2, 1], 1)]
    p0, p1 = np.exp([1, 0, 2]) / np.exp([1, 0, 2]).sum(), np.full(3, 1 / 3)
    q0, q1 = np.full(3, 1 / 3), np.exp([2, 1, 0]) / np.exp([2, 1, 0]).sum()
    kl = float((p0 * np.log(p0 / q0)).sum() + (p1 * np.log(p1 / q1)).sum())
    dnll = float(-np.log(q0[2]) + np.log(p0[2]) - np.log(q1[1]) + np.log(p1[1]))
    for k in (3, 2):                                   # all outcomes kept, or the top 2 plus the rest
        ref = metrics.reference_distributions(base, example, pad_id=0, k=k)
        got = metrics.kl_to_reference(tuned, example, pad_id=0, reference=ref)
        assert got["tokens"] == [2] and got["dnll"][0] == pytest.approx(dnll, rel=1e-6)
        if k == 3:
            assert got["kl"][0] == pytest.approx(kl, rel=1e-6)
        else:                                          # coarsened to 3 outcomes here too: exact again
            assert got["kl"][0] == pytest.approx(kl, rel=1e-6)
    same = metrics.kl_to_reference(base, example, 0, metrics.reference_distributions(base, example, 0, k=2))
    assert same["kl"][0] == pytest.approx(0.0, abs=1e-7) and same["dnll"][0] == pytest.approx(0.0, abs=1e-6)


def test_kl_of_the_kept_top_k_is_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    base, tuned = random_model(std=0.3), random_model(seed=1, std=0.3)
    g = torch.Generator().manual_seed(0)
    texts = [Example(torch.randint(1, 97, (n,), generator=g).tolist(), 1) for n in (6, 11)]
    exact = []
    for e in texts:
        with torch.no_grad():
            lp = base(torch.tensor([e.ids[:-1]]))[0][0].log_softmax(-1).double()
            lq = tuned(torch.tensor([e.ids[:-1]]))[0][0].log_softmax(-1).double()
        exact.append(float((lp.exp() * (lp - lq)).sum()))
    full = metrics.kl_to_reference(tuned, texts, 0, metrics.reference_distributions(base, texts, 0, k=97))
    assert full["kl"] == pytest.approx(exact, rel=1e-5)
    coarse = metrics.kl_to_reference(tuned, texts, 0, metrics.reference_distributions(base, texts, 0, k=5))
    assert all(c <= e * (1 + 1e-6) for c, e in zip(coarse["kl"], exact)) and sum(coarse["kl"]) > 0


# ----------------------------------------------------------------------------- likelihoods
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


def test_option_likelihood_picks_the_answer_the_model_is_forced_to_give():
    base = random_model()
    model = ForcedModel(base.config, favourite=7)
    model.load_state_dict(base.state_dict())
    model.eval()
    prompt, a, b = [5, 9, 11], [3, 8], [3, 7]
    (lp_a, lp_b), = metrics.option_logprobs(model, [prompt], [[a, b]])
    for option, lp in ((a, lp_a), (b, lp_b)):         # by hand: log-softmax of the full sequence
        ids = prompt + option
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
        assert lp == pytest.approx([float(logp[len(prompt) - 1 + t, ids[len(prompt) + t]]) for t in range(2)], abs=1e-4)
    (dist,) = metrics.option_distributions([[lp_a, lp_b]])
    assert dist[1] > math.log(0.99) and math.exp(dist[0]) + math.exp(dist[1]) == pytest.approx(1.0)
    assert metrics.categorical_kl(dist, dist) == pytest.approx(0.0, abs=1e-12)
    assert metrics.categorical_kl([math.log(0.5)] * 2, [math.log(0.9), math.log(0.1)]) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


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


def test_perplexity_change_is_exp_of_the_mean_token_nll_change():
    base, tuned = random_model(std=0.2), random_model(seed=3, std=0.2)
    g = torch.Generator().manual_seed(1)
    passages = [Example(torch.randint(1, 97, (n,), generator=g).tolist(), 1) for n in (7, 20, 12)]

    def by_hand(model):                               # every token but the first
        total = 0.0
        for p in passages:
            with torch.no_grad():
                logp = model(torch.tensor([p.ids]))[0][0].log_softmax(-1)
            total -= sum(float(logp[t - 1, p.ids[t]]) for t in range(1, len(p.ids)))
        return total / sum(len(p.ids) - 1 for p in passages)

    ref = metrics.reference_distributions(base, passages, 0)
    assert float(sum(r["nll"].sum() for r in ref)) / sum(len(p.ids) - 1 for p in passages) == pytest.approx(
        by_hand(base), rel=1e-5)
    got = metrics.kl_to_reference(tuned, passages, 0, ref)
    dnll = sum(got["dnll"]) / sum(got["tokens"])
    assert dnll == pytest.approx(by_hand(tuned) - by_hand(base), rel=1e-4)
    assert math.exp(dnll) - 1 == pytest.approx(math.exp(by_hand(tuned)) / math.exp(by_hand(base)) - 1, rel=1e-4)


# ----------------------------------------------------------------------------- NQ-open distractors
def test_every_distractor_has_the_gold_answers_type_and_is_no_gold_alias():
    rows = [{"question": f"q{i}", "answers": [a]} for i, a in enumerate(
        ["1983", "March 6, 2009", "the 1980s", "Meghan Trainor", "Tobey Maguire", "Mavis Staples", "Terry Crews",
         "Paris, France", "Jersey City", "India", "Mexico City", "220", "six", "4", "15,000",
         "cockerel", "fats", "snowmobiling", "the lungs", "1964", "Robert Plant"])]
    items = ev.typed_distractors(rows, len(rows))
    for item in items:
        gold = answers.answer_type(item["answers"][0])
        assert item["options"][0] == item["answers"][0] and len(item["options"]) == 4
        assert all(answers.answer_type(d) == gold for d in item["options"][1:]), item
        assert item["answers"][0] not in item["options"][1:]
    assert {answers.answer_type(r["answers"][0]) for r in rows} == {"date", "person", "place", "number", "other"}


def test_every_distractor_of_the_real_nq_open_probe_has_the_gold_answers_type():
    rows = data.nq_open("heldout")
    items = ev.typed_distractors(rows, 200)
    for item in items:
        gold = answers.answer_type(item["answers"][0])
        assert all(answers.answer_type(d) == gold for d in item["options"][1:])
        normalised = {metrics.normalize_answer(a) for a in item["answers"]}
        assert not normalised & {metrics.normalize_answer(d) for d in item["options"][1:]}
    assert len({answers.answer_type(i["answers"][0]) for i in items}) == 5


def test_question_texts_are_deduplicated_across_the_splits():
    key = data.question_key
    calibration = {key(r["question"]) for r in data.nq_open("calibration")}
    heldout = {key(r["question"]) for r in data.nq_open("heldout")}
    assert not calibration & heldout
    splits = {s: {key(r["question"]) for r in data.asdiv(s)} for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert key("  What is it?? ") == key("what is  it") and len(data.deduplicated(
        [{"question": "A b?"}, {"question": "a B"}, {"question": "c"}])) == 2


# ----------------------------------------------------------------------------- curves and the bootstrap
def test_matched_loss_interpolates_along_the_frontier_of_a_hand_built_curve():
    # (loss, cost): the base (4, 0); two runs; (2.5, 0.9) is beaten by (2.0, 0.5) and left out
    losses, costs = [4.0, 3.0, 2.0, 1.0, 2.5, 1.5], [0.0, 0.1, 0.5, 2.0, 0.9, 3.0]
    xs, ys = stats.frontier(losses, costs)
    assert xs.tolist() == [1.0, 2.0, 3.0, 4.0] and ys.tolist() == [2.0, 0.5, 0.1, 0.0]
    assert stats.cost_at(losses, costs, 2.5) == pytest.approx(0.3)          # halfway between 0.5 and 0.1
    assert stats.cost_at(losses, costs, 1.5) == pytest.approx(1.25)
    assert stats.cost_at(losses, costs, 3.5) == pytest.approx(0.05)
    assert stats.cost_at(losses, costs, 2.0) == pytest.approx(0.5)
    assert math.isnan(stats.cost_at(losses, costs, 0.5))                     # never reached
    assert stats.cost_at(losses, costs, 9.0) == 0.0


def test_bootstrap_interval_covers_a_known_mean_about_95_times_in_100():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        values = rng.exponential(2.0, size=80)           # skewed, true mean 2
        _, low, high = stats.bootstrap_mean_ci(values, n_boot=1000, seed=trial)
        covered += low <= 2.0 <= high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_matched_costs_recover_a_known_difference_with_paired_intervals():
    # two methods with the same task-loss points; B's cost is A's plus 0.1 on every item
    rng = np.random.default_rng(1)

    def seed_curve(shift):
        loss_items = np.stack([np.full(40, 4.0), np.full(40, 2.0)]) + rng.normal(0, 0.05, (2, 40))
        cost_items = np.stack([np.zeros(30), np.full(30, 1.0)]) + rng.normal(0, 0.2, (2, 30))
        cost_items[1] += shift
        return {"loss_sum": loss_items, "loss_tokens": np.ones(40), "cost_sum": cost_items, "cost_tokens": np.ones(30)}

    curves = {"a": [seed_curve(0.0) for _ in range(3)], "b": [seed_curve(0.1) for _ in range(3)]}
    # at task loss 2.2 the frontier is 90% of the way from the base (4, 0) to the trained point (2, cost)
    matched = stats.matched_costs(curves, target=2.2, n_boot=400)
    assert matched["a"]["value"] == pytest.approx(0.9, abs=0.1) and matched["a"]["reached"] == 1.0
    assert matched["a"]["low"] < matched["a"]["value"] < matched["a"]["high"]
    d = stats.difference(matched["b"], matched["a"])
    assert d["value"] == pytest.approx(0.09, abs=0.06) and d["low"] < d["value"] < d["high"]


# ----------------------------------------------------------------------------- learning rates
def test_lr_rule_takes_the_lowest_mean_validation_loss_ties_to_the_smaller_lr():
    assert stats.best_lr({1e-3: 1.5, 3e-3: 1.3, 1e-2: math.inf}) == 3e-3   # a diverged seed makes 1e-2 infinite
    assert stats.best_lr({1e-2: 1.0, 1e-3: 1.0}) == 1e-3
    assert stats.best_lr({1e-2: math.inf}) is None
    assert suite.mean_final_loss([{"final": {"scores": {"val_loss": 1.0}}}, {"diverged": "nan"}]) == math.inf


def test_the_grid_extends_when_the_best_point_is_at_an_edge():
    assert suite.next_lr({1e-3: 1.0, 2e-3: 1.2, 4e-3: 1.5}, extensions_left=1) == 5e-4     # best at the bottom
    assert suite.next_lr({1e-3: 1.5, 2e-3: 1.2, 4e-3: 1.0}, extensions_left=1) == 8e-3     # best at the top
    assert suite.next_lr({1e-3: 1.5, 2e-3: 1.0, 4e-3: 1.2}, extensions_left=1) is None     # best inside
    assert suite.next_lr({1e-3: 1.5, 2e-3: 1.2, 4e-3: 1.0}, extensions_left=0) is None     # budget spent
    assert suite.next_lr({1e-3: 1.5, 2e-3: 1.0, 4e-3: math.inf}, extensions_left=1) is None


# ----------------------------------------------------------------------------- whole models
def test_merged_model_evaluates_like_base_plus_adapter():
    model, tok = toy.load_toy_model(0, "random", log=lambda *a: None)
    probes = ev.prepare_toy(tok, 0)
    ref = ev.reference(model, tok, probes)
    nullspace.inject_adapters(model, r=4, alpha=8, init="pissa")
    with torch.no_grad():                               # a trained-looking adapter
        g = torch.Generator().manual_seed(0)
        for layer in lora.lora_layers(model).values():
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g))
    unmerged = ev.evaluate(model, tok, probes, ref)
    lora.merge_lora(model)
    merged = ev.evaluate(model, tok, probes, ref)
    for key in ("test_right", "em"):
        assert unmerged["items"][key] == merged["items"][key]
    for key, value in unmerged["scores"].items():
        assert merged["scores"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert unmerged["scores"]["kl"] > 0.01 and unmerged["scores"]["em"] < 1.0   # the adapter changed the model


def test_base_model_scores_zero_against_itself():
    model, tok = toy.load_toy_model(1, "bottom", log=lambda *a: None)
    probes = ev.prepare_toy(tok, 1)
    result = ev.evaluate(model, tok, probes, ev.reference(model, tok, probes))
    assert result["scores"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["scores"]["dnll"] == pytest.approx(0.0, abs=1e-5)
    assert result["scores"]["em"] == 1.0                # the toy model knows its held-out facts


def test_a_small_study_reports_every_method_and_resumes_from_its_files(tmp_path, monkeypatch):
    settings = dict(suite.SUITES["toy"], seeds=(0, 1), lrs=(1e-2, 2e-2), steps=12, eval_every=6, max_extensions=1,
                    variants={"random": ("lora", "null-v2", "lora-fa"), "bottom": ("null-v2",)})
    monkeypatch.setitem(suite.SUITES, "toy", settings)
    out = tmp_path / "toy"
    t0 = time.time()
    results = ev.main(["--suite", "toy", "--out", str(out)])
    elapsed = time.time() - t0
    main = results["variants"]["random"]
    assert set(main["table"]) == {"lora", "null-v2", "lora-fa"}
    for method, row in main["table"].items():
        assert row["n_seeds"] == 2
        for key, _, _, _ in suite.report.TOY_COLUMNS:
            assert all(math.isfinite(x) for x in row[key]), (method, key)
    runs = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").glob("*/*/*.json"))
    assert len(runs) >= 3 * 2 * 2 + 2 * 2 and "bottom/null-v2/lr0.01-seed1.json" in runs
    table = (out / "results.md").read_text()
    assert "LoRA-Null v2" in table and "matched" in table and "## overlap: bottom" in table
    assert json.loads((out / "results.json").read_text())["variants"]["random"]["chosen"].keys() == main["table"].keys()
    for plot in ("curves-random", "forest-random", "energy-random", "disturbance-random", "effective_rank", "spectra"):
        assert (out / f"{plot}.png").stat().st_size > 1000
    # LoRA-Null v2 freezes its null-space A: at the end it reads the least of the calibration energy
    assert main["table"]["null-v2"]["energy_final"][0] < main["table"]["lora-fa"]["energy_final"][0] / 10
    t1 = time.time()
    again = ev.main(["--suite", "toy", "--out", str(out)])   # resumes: every run is read back
    assert again["variants"]["random"]["table"] == main["table"]
    assert time.time() - t1 < elapsed / 3
    with pytest.raises(ValueError, match="other settings"):
        monkeypatch.setitem(suite.SUITES, "toy", {**settings, "steps": 13})
        ev.main(["--suite", "toy", "--out", str(out)])


@pytest.mark.parametrize("overlap", toy.OVERLAPS)
def test_the_toy_overlap_knob_puts_the_new_skills_inputs_in_the_chosen_eigenspace(overlap):
    """Each synonym's first-layer attention input projects >= 90% (of its squared norm) onto the
    chosen eigenspace of the calibration covariance, and <= 10% onto an opposite one."""
    seed = 1
    model, tok = toy.load_toy_model(seed, overlap, log=lambda *a: None)
    C = toy.input_covariance(model, tok, toy.calibration_facts(seed))
    chosen = toy.eigenspace(C, overlap, seed)
    opposite = toy.eigenspace(C, "top" if overlap == "bottom" else "bottom", seed)
    norm = model.layers[0].attention_norm
    for synonym in toy.SYNONYMS:
        x = norm(model.tok_embeddings.weight[tok.vocab[synonym]][None]).double()[0]  # the layer's input
        share = float((chosen.T @ x).square().sum() / x.square().sum())
        assert share >= 0.9, (overlap, synonym, share)
        if overlap != "random":
            assert float((opposite.T @ x).square().sum() / x.square().sum()) <= 0.1, (overlap, synonym)
