"""The measurements of issue 17 on hand-built cases: lm-eval-style multiple choice (acc vs
acc_norm, option KL by hand), the benchmark loaders' prompts and subsets, Wikipedia body text
without its title, the digit / other split of the answer loss, the numeric distractors, the
chat probe, and the number of items a stated precision needs."""
import json
import math

import pytest
import torch

import eval as ev
from conftest import random_model
from loranull_mini import answers, data, metrics
from loranull_mini.data import Example


class CharTokenizer:
    """Printable ASCII, one id per character (1..95), and an end-of-turn id 96: a vocabulary
    that fits the tiny random model of conftest (97 ids)."""
    pad_id, end_of_turn_id, stop_ids = 0, 96, (96,)

    def encode(self, text, **_):
        return [ord(c) - 31 for c in text if 32 <= ord(c) < 127]

    def decode(self, ids):
        return "".join(chr(i + 31) if 0 < i < 96 else "" for i in ids)

    def encode_chat(self, messages, add_generation_prompt=True):
        ids = [t for m in messages for t in self.encode(f"{m['role']}: {m['content']}\n")]
        return ids + (self.encode("assistant: ") if add_generation_prompt else [])


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- multiple choice
def test_acc_and_acc_norm_pick_different_options_on_a_hand_built_item():
    # option 0: -6 nats over 2 characters (-3 per char); option 1: -10 over 10 (-1 per char)
    acc, acc_norm = metrics.choice_accuracy([-6.0, -10.0], ["ab", "abcdefghij"], label=1)
    assert (acc, acc_norm) == (False, True)
    assert metrics.choice_accuracy([-6.0, -10.0], ["ab", "abcdefghij"], label=0) == (True, False)


def test_choice_scores_sum_each_options_tokens_after_the_context_with_a_leading_space():
    model, tok = random_model(std=0.3), CharTokenizer()
    items = [{"context": "Question: a?\nAnswer:", "options": ["yes", "no way"], "label": 1},
             {"context": "Q: b\nA:", "options": ["x", "yy", "zzz"], "label": 0}]
    got = metrics.choice_scores(model, tok, items)
    for item, sums, acc, acc_norm in zip(items, got["logprobs"], got["acc"], got["acc_norm"]):
        prompt = tok.encode(item["context"])
        examples = [Example(prompt + tok.encode(" " + o), len(prompt)) for o in item["options"]]
        nll, _ = metrics.sequence_nll(model, examples, tok.pad_id)      # scored in full, independently
        assert sums == pytest.approx([-x for x in nll], abs=1e-4)
        assert (acc, acc_norm) == metrics.choice_accuracy(sums, item["options"], item["label"])


def test_option_kl_by_hand_renormalises_over_the_options():
    base = [math.log(0.5) - 3, math.log(0.25) - 3, math.log(0.25) - 3]   # sums need not add to 1
    tuned = [math.log(0.25) + 1, math.log(0.5) + 1, math.log(0.25) + 1]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    assert metrics.option_kl([base, base], [tuned, base]) == pytest.approx([expected, 0.0], abs=1e-12)
    assert expected == pytest.approx(0.25 * math.log(2))


def test_benchmark_prompts_are_lm_eval_harness_prompts(tmp_path):
    write_jsonl(tmp_path / "PIQA" / "validation.jsonl",
                [{"question": "Open a jar", "options": "A. twist the lid \nB. eat the lid", "answer": "A. twist the lid"}])
    write_jsonl(tmp_path / "SIQA" / "test.jsonl",
                [{"passage": "Kai lost.", "question": "How does Kai feel?", "options": "A. sad\nB. glad\nC. hungry",
                  "answer": "A. sad"}])
    write_jsonl(tmp_path / "OpenBookQA" / "test.jsonl",
                [{"question": "Fog is found around: ", "options": "A. a desert\nB. a marsh\nC. the sun\nD. space",
                  "answer": "B. a marsh"}])
    assert data.benchmark("piqa", root=tmp_path) == [
        {"context": "Question: Open a jar\nAnswer:", "options": ["twist the lid", "eat the lid"], "label": 0}]
    assert data.benchmark("siqa", root=tmp_path) == [
        {"context": "Q: Kai lost. How does Kai feel?\nA:", "options": ["sad", "glad", "hungry"], "label": 0}]
    assert data.benchmark("obqa", root=tmp_path) == [
        {"context": "Fog is found around:", "options": ["a desert", "a marsh", "the sun", "space"], "label": 1}]
    with pytest.raises(ValueError, match="unknown benchmark"):
        data.benchmark("hellaswag", root=tmp_path)


def test_benchmark_subsets_are_fixed_by_their_seed_on_the_real_files():
    for name, k in (("piqa", 2), ("siqa", 3), ("obqa", 4)):
        a, b, c = data.benchmark(name, 50, seed=0), data.benchmark(name, 50, seed=0), data.benchmark(name, 50, seed=1)
        assert a == b and a != c
        assert all(len(it["options"]) == k and 0 <= it["label"] < k and all(it["options"]) for it in a)
    assert len(data.benchmark("piqa")) == 1500 and len(data.benchmark("siqa")) == 1954
    assert len(data.benchmark("obqa")) == 500


# ----------------------------------------------------------------------------- Wikipedia body text
def test_the_title_is_not_among_the_wikipedia_tokens_scored(tmp_path):
    passages = [f"Title{i} Of Page -- Body {i} " + "words and more words " * 5 for i in range(4)]
    passages.append("Short -- too short")                                   # fewer body tokens: skipped
    write_jsonl(tmp_path / "BoolQ" / "combined.jsonl", [{"passage": p} for p in passages])
    tok = CharTokenizer()
    examples = data.wiki_body(tok, 4, 64, root=tmp_path)
    batch = data.collate(examples, tok.pad_id)
    for b, e in enumerate(examples):
        scored = tok.decode(batch["targets"][b][batch["loss_mask"][b] > 0].tolist())
        title, body = tok.decode(e.ids[:e.n_prompt]), scored
        assert title.startswith("Title") and title.endswith(" --")
        assert body.startswith(" Body") and "Title" not in body and len(scored) == 64
    with pytest.raises(ValueError, match="5 Wikipedia passages with 64 body tokens"):
        data.wiki_body(tok, 5, 64, root=tmp_path)


def test_items_for_precision_solves_the_standard_error_for_n():
    # values 1 and 3: mean 2, sd sqrt(2); SE = 10% of the mean needs (sqrt(2) / 0.2)^2 = 50 items
    assert metrics.items_for_precision([1.0, 3.0], rel_se=0.1) == 50
    values = [0.5, 1.0, 1.5, 2.0, 4.0]
    n = metrics.items_for_precision(values, rel_se=0.05)
    mean, sd = metrics.mean_std(values)
    assert sd / math.sqrt(n) <= 0.05 * mean < sd / math.sqrt(n - 1)


# ----------------------------------------------------------------------------- what the task learnt
def test_the_digit_and_other_parts_add_up_to_the_answer_loss():
    model, tok = random_model(std=0.3), CharTokenizer()
    examples = [data.encode_qa(tok, q, a) for q, a in (("How many?", "136 dollars"), ("And now?", "7 apples"))]
    logprobs = metrics.answer_logprobs(model, examples)
    split = metrics.digit_split(tok, examples, logprobs)
    nll, count = metrics.sequence_nll(model, examples, tok.pad_id)          # the answer loss, independently
    assert [d + o for d, o in zip(split["digit_nll"], split["other_nll"])] == pytest.approx(nll, abs=1e-4)
    assert split["digit_tokens"] == [3, 1]                                   # "1" "3" "6"; "7"
    assert [d + o for d, o in zip(split["digit_tokens"], split["other_tokens"])] == count
    per_token = [-lp for lp in logprobs[0]]                                  # digits are tokens 0..2 of the answer
    assert split["digit_nll"][0] == pytest.approx(sum(per_token[:3]))


def test_numeric_distractors_come_from_the_problem_and_differ_from_the_gold():
    question = "Ellen had 380 legos, but she lost 57 of them. How many legos does she have now?"
    got = answers.numeric_distractors(question, 323.0, k=3, seed=0)
    assert len(got) == 3 and 323.0 not in got and set(got) <= {380.0, 57.0, 437.0, 380.0 * 57}
    got = answers.numeric_distractors("Add 3 and 5.", 8.0, k=3, seed=1)      # 3 + 5 is the gold: never offered
    assert len(got) == 3 and set(got) <= {3.0, 5.0, 2.0, 15.0}
    few = answers.numeric_distractors("How many are there?", 0.0, k=3)        # no numbers: the gold's neighbours
    assert few == [1.0, -1.0, 10.0]


def test_every_contrastive_distractor_is_a_number_different_from_the_gold_on_all_of_asdiv():
    rows = data.asdiv("train") + data.asdiv("val") + data.asdiv("test")
    items = answers.asdiv_numeric_choices(rows)
    assert len(items) > 0.85 * len(rows)
    for r in items:
        gold = metrics.parse_number(r["number"])
        assert len(r["options"]) == 4 and r["options"][0] == r["answer"]
        numbers = [metrics.extract_number(o) for o in r["options"]]
        assert all(n is not None for n in numbers), r["options"]
        assert not any(metrics.same_number(n, gold) for n in numbers[1:]), r
        assert len({round(n, 6) for n in numbers}) == 4, r                   # distinct options
        unit = r["answer"][len(r["number"]):]
        assert all(o.endswith(unit) for o in r["options"])                  # only the number differs


# ----------------------------------------------------------------------------- chat probe and calibration
def test_chat_answers_are_the_greedy_continuation_and_end_with_the_turn():
    model, tok = random_model(std=0.3), CharTokenizer()
    questions = ["What is up?", "Why?"]
    answers = metrics.chat_answers(model, tok, questions, max_new_tokens=6)
    for q, a in zip(questions, answers):
        prompt = tok.encode_chat([{"role": "user", "content": q}])
        ids = list(prompt)
        for _ in range(len(a)):                     # greedy by hand, without a cache
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
            if ids[-1] in tok.stop_ids:
                break
        expected = ids[len(prompt):]
        assert a == (expected if len(expected) < 6 or expected[-1] in tok.stop_ids else expected[:6])


def test_chat_windows_join_whole_conversations_and_refuse_too_little_text():
    conversations = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert data.chat_windows(conversations, 2, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="9 tokens, 2 x 5 needed"):
        data.chat_windows(conversations, 2, 5)


def test_evaluate_reports_the_new_probes_and_scores_the_base_at_zero(monkeypatch):
    model, tok = random_model(std=0.3, max_seq_len=256), CharTokenizer()
    items = [{"context": "Question: a?\nAnswer:", "options": ["yes", "no way"], "label": 1}] * 3
    probes = ev.Probes(retention=[Example(tok.encode("Title -- body text here"), 8)],
                       val=[data.encode_qa(tok, "1+1?", "2 apples")],
                       test=[data.encode_qa(tok, "2+2?", "4 apples"), data.encode_qa(tok, "3+3?", "6 pears")],
                       test_rows=[], benchmarks={"piqa": items}, chat_questions=["Hi?", "Who?"], chat_tokens=5)
    monkeypatch.setattr(ev, "answer_accuracy", lambda *a, **k: [])
    monkeypatch.setattr(ev, "exact_match", lambda *a, **k: [])
    ref = ev.reference(model, tok, probes, top_k=97)
    base = ev.evaluate(model, tok, probes, ref)
    assert base["items"]["piqa_kl"] == pytest.approx([0.0] * 3, abs=1e-9)
    assert base["scores"]["chat_kl"] == pytest.approx(0.0, abs=1e-6)
    assert len(base["items"]["chat_kl"]) == 2
    assert [d + o for d, o in zip(base["items"]["test_digit_nll"], base["items"]["test_other_nll"])] == \
        pytest.approx(base["items"]["test_nll"])
    tuned = random_model(seed=5, std=0.3, max_seq_len=256)
    moved = ev.evaluate(tuned, tok, probes, ref)
    assert moved["scores"]["chat_kl"] > 0.01 and moved["scores"]["piqa_kl"] > 0


def test_chat_calibration_windows_hold_the_calibration_questions_with_the_models_own_answers():
    model, tok = random_model(std=0.3, max_seq_len=256), CharTokenizer()
    windows = metrics.chat_calibration_windows(model, tok, n_samples=3, seq_len=40, answer_tokens=8)
    q = data.nq_open("calibration")[0]["question"]
    first = tok.encode_chat([{"role": "user", "content": q}]) + metrics.chat_answers(model, tok, [q], 8)[0]
    assert windows.shape == (3, 40)
    n = min(len(first), 120)
    assert windows.flatten().tolist()[:n] == first[:n]
    with pytest.raises(ValueError, match="generated by the base model"):
        data.calibration_texts("chat")
