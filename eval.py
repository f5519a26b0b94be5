"""Does the adapter keep what the model knew, and learn the task? The measurements.

    python eval.py --adapter runs/real-null/adapter   # SmolLM2 + a trained adapter, against SmolLM2
    python eval.py --suite toy                        # every method on the toy world (loranull_mini/suite.py)
    python eval.py --suite real                       # every method on SmolLM2, measured curves, seeds (resumable)
    python eval.py --suite real --report-only         # rebuild its tables and figure from docs/results/real/runs
    python eval.py --suite real-long                  # the same study for a GPU: 1 epoch, 5 seeds, 3 lrs per method
    python eval.py --suite real --quick               # the earlier small grid study (real-quick)
    python eval.py --suite real-calibration           # LoRA-Null v2 calibrated on Wikipedia / the task
    python eval.py --suite gpu                        # all a GPU is for (loranull_mini/gpu_run.py)

Retention ("forgetting"), always on data that neither calibration nor training saw, and
paired item by item with the base model, so the base model scores exactly 0:
- Wikipedia (the headline): per-token KL(base || tuned) and the NLL change on the body text
  of held-out passages (the first wiki_tokens tokens after the title line, which is context
  only). The KL is taken over the base model's 512 most likely tokens plus one bin for
  the rest, a lower bound of the full KL (metrics.reference_distributions);
- standard benchmarks PIQA, SIQA, OpenBookQA, prompted and scored as lm-eval-harness does:
  acc, acc_norm and, paired with the base model, the KL of each item's option distribution;
- chat: per-token KL(base || tuned) on the base model's own greedy chat-template answers
  to held-out NQ-open questions, generated once (reference) and teacher-forced;
- NQ-open contrastive: the gold answer against 3 distractors of the same answer type
  (number, date, person, place, other: loranull_mini/answers.py), after a plain "Q: ..\\nA:"
  prompt and inside the chat template: accuracy, margin and the KL of the distribution
  over the 4 options;
- MMLU and TruthfulQA: the KL of the distribution over the options against the base
  model (TruthfulQA's options: the gold and 3 other questions' answers), and accuracy;
- NQ-open exact match of the greedy answer (about 1% for a 135M model; for comparison with
  the paper, not for conclusions).
Task: the answer loss (NLL per answer token, chat template) on held-out ASDiv problems, per
item, on the validation split (for curves) and the test split (for tables, split into digit
and other tokens), greedy accuracy, and a contrastive numeric accuracy (the gold answer against
the same answer with other numbers of the problem). The toy world measures held-out facts (KL
of their answers, accuracy) and the new skill the same way. docs/MEASURES.md: how each is sized.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loranull_mini import adapter_io, gpu_run, metrics, study, suite  # first: the package sets the thread policy before torch
import torch

import train
from loranull_mini import data as datasets
from loranull_mini.answers import answer_type, asdiv_numeric_choices
from loranull_mini.data import Example
from loranull_mini.devices import pick_device
from loranull_mini.files import write_json

SIZES = {  # evaluation sets of a full evaluation (suites may choose smaller ones)
    "wiki": 200, "wiki_tokens": 96, "nq": 200, "nq_em": 64, "mmlu": 100, "tqa": 100, "val": 100,
    "test": 150, "test_acc": 64, "top_k": 512,
    # on when named (0 or absent: off): benchmark items, their subset's seed, chat questions, answer tokens
    "piqa": 300, "siqa": 300, "obqa": 300, "bench_seed": 0, "chat": 64, "chat_tokens": 48,
}


@dataclass
class Probes:
    """Every evaluation set, as token ids, prepared once for one tokenizer."""
    retention: list[Example]            # scored tokens: Wikipedia passages (toy: held-out facts' answers)
    val: list[Example]                  # the task's validation items (prompt + answer)
    test: list[Example]                 # the task's test items
    test_rows: list[dict]               # their questions and answers, for accuracy
    choices: dict = field(default_factory=dict)   # name -> (prompts, options): gold is option 0
    nq_em: list[dict] = field(default_factory=list)
    benchmarks: dict = field(default_factory=dict)  # "piqa", "siqa", "obqa" -> items {context, options, label}
    chat_questions: list[str] = field(default_factory=list)  # answered by the base model in reference()
    chat_tokens: int = 48               # the longest base answer, in tokens
    toy: bool = False


def prepare_real(tok, sizes: dict = SIZES) -> Probes:
    """The real model's probes (fixed items, no randomness beyond fixed seeds)."""
    wiki = datasets.wiki_body(tok, sizes["wiki"], sizes["wiki_tokens"])  # body text: the title is context only
    nq = typed_distractors(datasets.nq_open("heldout"), sizes["nq"])
    eot = [tok.end_of_turn_id]
    choices = {
        "nq_plain": ([tok.encode(f"Q: {r['question'].strip().rstrip('?')}?\nA:") for r in nq],
                     [[tok.encode(" " + o) for o in r["options"]] for r in nq]),
        "nq_chat": ([tok.encode_chat([{"role": "user", "content": r["question"]}]) for r in nq],
                    [[tok.encode(o) + eot for o in r["options"]] for r in nq]),
    }
    mmlu = datasets.mmlu(sizes["mmlu"])
    choices["mmlu"] = ([tok.encode(f"Question: {r['question'].strip()}\nAnswer:") for r in mmlu],
                       [[tok.encode(" " + o) for o in [r["options"][r["answer"]]] + [o for i, o in enumerate(r["options"])
                                                                                      if i != r["answer"]]] for r in mmlu])
    tqa = datasets.truthfulqa(10 ** 6)
    rng = random.Random(7)
    choices["tqa"] = ([tok.encode(f"Q: {r['question'].strip()}\nA:") for r in tqa[:sizes["tqa"]]],
                      [[tok.encode(" " + r["answers"][0])] + [tok.encode(" " + other["answers"][0])
                                                              for other in rng.sample(tqa[:i] + tqa[i + 1:], 3)]
                       for i, r in enumerate(tqa[:sizes["tqa"]])])
    test_rows = datasets.asdiv("test")[:sizes["test"]]
    numeric = asdiv_numeric_choices(test_rows)   # the gold answer against other numbers of the problem
    choices["asdiv_numeric"] = ([tok.encode_chat([{"role": "user", "content": r["question"]}]) for r in numeric],
                                [[tok.encode(o) + eot for o in r["options"]] for r in numeric])
    benchmarks = {name: datasets.benchmark(name, sizes[name], seed=sizes.get("bench_seed", 0))
                  for name in datasets.BENCHMARKS if sizes.get(name)}
    return Probes(retention=wiki, val=qa_examples(tok, datasets.asdiv("val")[:sizes["val"]]),
                  test=qa_examples(tok, test_rows), test_rows=test_rows[:sizes["test_acc"]], choices=choices,
                  nq_em=nq[:sizes["nq_em"]], benchmarks=benchmarks,
                  chat_questions=datasets.chat_questions(sizes["chat"]) if sizes.get("chat") else [],
                  chat_tokens=sizes.get("chat_tokens", SIZES["chat_tokens"]))


def typed_distractors(rows: list[dict], n: int, k: int = 3) -> list[dict]:
    """The first n questions with options [gold, k distractors]: answers of other questions
    of the gold's type, none equal to a gold alias, drawn with a fixed seed per item."""
    pool = {}
    for r in rows:
        pool.setdefault(answer_type(r["answers"][0]), []).append(r["answers"][0])
    out = []
    for i, r in enumerate(rows[:n]):
        gold = {metrics.normalize_answer(a) for a in r["answers"]}
        same = [a for a in dict.fromkeys(pool[answer_type(r["answers"][0])]) if metrics.normalize_answer(a) not in gold]
        out.append({**r, "options": [r["answers"][0]] + random.Random(1000 + i).sample(same, k)})
    return out


def prepare_toy(tok, seed: int) -> Probes:
    from loranull_mini import toy
    facts = toy.heldout_facts(seed)
    test_rows = toy.skill_task("test", seed=seed)
    return Probes(retention=qa_examples(tok, facts), val=qa_examples(tok, toy.skill_task("val", seed=seed)),
                  test=qa_examples(tok, test_rows), test_rows=test_rows, nq_em=facts, toy=True)


def qa_examples(tok, rows) -> list[Example]:
    """Question in the chat template, then the answer and the end of the turn: what training scores."""
    return [datasets.encode_qa(tok, r["question"], r.get("answer") or r["answers"][0]) for r in rows]


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def reference(base, tok, probes: Probes, top_k: int = SIZES["top_k"]) -> dict:
    """What the base model does on every probe, kept for the paired measurements."""
    ref = {"retention": metrics.reference_distributions(base, probes.retention, tok.pad_id, k=top_k)}
    for name, (prompts, options) in probes.choices.items():
        ref[name] = metrics.option_distributions(metrics.option_logprobs(base, prompts, options))
    for name, items in probes.benchmarks.items():
        ref[name] = metrics.choice_scores(base, tok, items)["logprobs"]
    if probes.chat_questions:   # the base model's own answers, generated once, then teacher-forced
        ref["chat_examples"] = metrics.chat_examples(base, tok, probes.chat_questions, probes.chat_tokens)
        ref["chat"] = metrics.reference_distributions(base, ref["chat_examples"], tok.pad_id, k=top_k)
    return ref


@torch.no_grad()
def evaluate(model, tok, probes: Probes, ref: dict, full: bool = True) -> dict:
    """{"scores": {name: mean}, "items": {name: per-item list}, "seconds"} of one model. Items:
      kl, dnll, tokens             Wikipedia body text: summed KL(base || model), NLL change, token count
      val_nll, val_tokens          ASDiv validation answers: summed NLL, token count
    and with full (the end of a run):
      {choice}_right, _kl, _margin NQ (plain, chat), MMLU, TruthfulQA, asdiv_numeric: gold is the argmax,
                                   KL(base || model) of the option distribution, gold minus best other
      {bench}_acc, _acc_norm, _kl  piqa, siqa, obqa, as lm-eval-harness scores them
      chat_kl, chat_tokens         the base model's chat answers: summed per-token KL, token count
      test_nll, test_tokens, test_{digit,other}_{nll,tokens}, test_right, em    ASDiv test, NQ EM
    Scores of summed items are per token (kl, val_loss, chat_kl, test_digit_loss, ...).
    """
    t0 = time.time()
    r = metrics.kl_to_reference(model, probes.retention, tok.pad_id, ref["retention"])
    nll, tokens = metrics.answer_nll(model, probes.val)
    items = {"kl": r["kl"], "dnll": r["dnll"], "tokens": r["tokens"], "val_nll": nll, "val_tokens": tokens}
    scores = {"kl": sum(r["kl"]) / sum(r["tokens"]), "dnll": sum(r["dnll"]) / sum(r["tokens"]),
              "val_loss": sum(nll) / sum(tokens)}
    if full:
        for name, (prompts, options) in probes.choices.items():
            logp = metrics.option_distributions(metrics.option_logprobs(model, prompts, options))
            right = [max(range(len(p)), key=p.__getitem__) == 0 for p in logp]
            kl = [metrics.categorical_kl(b, p) for b, p in zip(ref[name], logp)]
            margin = [p[0] - max(p[1:]) for p in logp]
            items.update({f"{name}_right": right, f"{name}_kl": kl, f"{name}_margin": margin})
            scores.update({f"{name}_acc": mean(right), f"{name}_kl": mean(kl), f"{name}_margin": mean(margin)})
        for name, bench_items in probes.benchmarks.items():          # as lm-eval-harness scores them
            b = metrics.choice_scores(model, tok, bench_items)
            b = {"acc": b["acc"], "acc_norm": b["acc_norm"], "kl": metrics.option_kl(ref[name], b["logprobs"])}
            items.update({f"{name}_{k}": v for k, v in b.items()})
            scores.update({f"{name}_{k}": mean(v) for k, v in b.items()})
        if "chat" in ref:
            c = metrics.kl_to_reference(model, ref["chat_examples"], tok.pad_id, ref["chat"])
            items.update({"chat_kl": c["kl"], "chat_tokens": c["tokens"]})
            scores["chat_kl"] = sum(c["kl"]) / sum(c["tokens"])
        logprobs = metrics.answer_logprobs(model, probes.test)
        nll, tokens = [-sum(lp) for lp in logprobs], [len(lp) for lp in logprobs]
        split = metrics.digit_split(tok, probes.test, logprobs)
        right = answer_accuracy(model, tok, probes.test_rows, toy=probes.toy)
        em = exact_match(model, tok, probes.nq_em, toy=probes.toy)
        items.update({"test_nll": nll, "test_tokens": tokens, "test_right": right, "em": em,
                      **{f"test_{k}": v for k, v in split.items()}})
        scores.update({"test_loss": sum(nll) / sum(tokens), "test_acc": mean(right), "em": mean(em),
                       **{f"test_{k}_loss": sum(split[f"{k}_nll"]) / max(sum(split[f"{k}_tokens"]), 1)
                          for k in ("digit", "other")}})
    scores["ppl_change"] = math.exp(scores["dnll"]) - 1
    return {"scores": scores, "items": items, "seconds": time.time() - t0}


def answer_accuracy(model, tok, rows, toy: bool) -> list[bool]:
    """Greedy answers to chat-template questions: the toy's exact word, or ASDiv's first number."""
    prompts = [tok.encode_chat([{"role": "user", "content": r["question"]}]) for r in rows]
    texts = metrics.greedy_generate(model, tok, prompts, 3 if toy else 20)
    if toy:
        return [t.strip() == r["answer"] for t, r in zip(texts, rows)]
    return [metrics.same_number(metrics.extract_number(t), metrics.parse_number(r["number"])) for t, r in zip(texts, rows)]


def exact_match(model, tok, rows, toy: bool) -> list[bool]:
    """NQ-open closed book, greedy, stopped at newline / period / comma (toy: held-out facts)."""
    if toy:
        return answer_accuracy(model, tok, rows, toy=True)
    prompts = [tok.encode(f"Q: {r['question'].strip().rstrip('?')}?\nA:") for r in rows]
    texts = metrics.greedy_generate(model, tok, prompts, 10, stop_strings=("\n", ".", ","))
    return [metrics.exact_match(t, r["answers"]) for t, r in zip(texts, rows)]


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- one model
def evaluate_adapter(model_path: str, adapter: str, device: str = "auto", quick: bool = False) -> dict:
    """The base model and base + adapter on the real probes; the adapter's scores are paired
    with the base's."""
    from loranull_mini.checkpoint import load_model
    device, _ = pick_device(device)
    adapter_io.read_adapter(adapter)                    # a damaged or foreign directory: before anything loads
    base, tok = load_model(model_path or None, require_tokenizer=True)
    tuned = copy.deepcopy(base)
    adapter_io.load_adapter(tuned, adapter)             # an adapter of another base: before anything is evaluated
    for m in (base, tuned):
        m.to(device).eval()
    sizes = {**SIZES, **(suite.QUICK_SIZES if quick else {})}
    probes = prepare_real(tok, sizes)
    ref = reference(base, tok, probes, sizes["top_k"])
    base_eval = evaluate(base, tok, probes, ref)
    tuned_eval = evaluate(tuned, tok, probes, ref)
    return {"base": base_eval["scores"], "adapter": tuned_eval["scores"], "items": tuned_eval["items"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["toy", "real", "real-long", "real-calibration", "gpu"],
                        help="run a whole comparison (loranull_mini/suite.py)")
    parser.add_argument("--quick", action="store_true", help="the small version of the suite or of the evaluation sets")
    parser.add_argument("--adapter", default="", help="adapter directory (train.py's OUT/adapter) to evaluate")
    parser.add_argument("--model", default="", help="base checkpoint (.gguf, HF or Meta directory; default SmolLM2)")
    parser.add_argument("--out", default="", help="output directory (suite: default runs/eval-<suite>; "
                                                  "adapter: where eval.json goes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=1, help="suite: training runs in parallel processes")
    parser.add_argument("--report-only", action="store_true", help="suite: rebuild the report from finished runs")
    parser.add_argument("--budget-s", type=float, default=660.0, help="suite gpu: seconds for all of it")
    args = parser.parse_args(argv)
    if not args.suite and not args.adapter:
        parser.error("give --suite toy|real or --adapter DIR")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    pick_device(args.device)  # a clear error before anything loads
    if args.suite:
        measure = suite.Measures(prepare_real=prepare_real, prepare_toy=prepare_toy, reference=reference,
                                 evaluate=evaluate, load_model_and_data=train.load_model_and_data,
                                 finetune=train.finetune, TrainConfig=train.TrainConfig, sizes=SIZES)
        if args.suite == "gpu":   # all a GPU is for (loranull_mini/gpu_run.py); --quick: its plumbing on the CPU
            return gpu_run.run(measure, Path(args.out or "docs/results/gpu"), args.budget_s, args.quick, args.device)
        if args.suite in study.SUITES and not args.quick:
            return study.run(args.suite, measure, out=args.out, device=args.device, report_only=args.report_only)
        return suite.run(args.suite, args.quick, measure, out=args.out, device=args.device,
                         workers=args.workers, report_only=args.report_only)
    result = evaluate_adapter(args.model, args.adapter, args.device, args.quick)
    print(json.dumps({"base": result["base"], "adapter": result["adapter"]}, indent=1))
    if args.out:
        write_json(Path(args.out) / "eval.json", result)
    return result


if __name__ == "__main__":
    from loranull_mini.assets import AssetError
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError, AssetError) as e:
        sys.exit(f"error: {e}")
