"""Does the adapter keep what the model knew, and learn the task? python eval.py --suite toy

    python eval.py --suite toy                  # all six methods on the toy world, 3 seeds (~2 min, 2 CPU cores)
    python eval.py --suite real                 # SmolLM2-135M-Instruct, NQ-open / MMLU / Wikipedia + ASDiv
                                                #   (~60-90 min on 2 CPU cores, resumable; minutes on a GPU)
    python eval.py --suite real --quick         # the same pipeline, small (~15 min on 2 CPU cores)
    python eval.py --model PATH --adapter DIR   # one model (+ adapter), no training

A suite fine-tunes every method (vanilla LoRA, PiSSA, MiLoRA, CorDA-KPA, LoRA-Null v1 and
v2) with train.py under one budget, evaluates the base model and every result, and writes
to --out: results.md (tables), results.json (every number), plots (PNG), and one folder per
training run (adapter, metrics.jsonl, run.json, eval.json).

Knowledge retention ("forgetting" in the paper), always on data that neither the
calibration nor the training saw:
- NQ-open, closed book, on the held-out split (calibration used the other split):
  exact match of the greedy answer (stopped at newline / period / comma, normalised as the
  standard NQ-open scorer does: lower case, no punctuation, no articles);
  contrastive likelihood: the gold answer against k distractors (answers of other
  NQ-open questions) after the same prompt; accuracy = gold is the most likely (mean
  log-prob per token), margin = gold minus the best distractor. Fine-tuning on short
  answers raises the likelihood of every short answer; the contrast cancels that format
  shift, which the raw gold log-likelihood (also reported) does not;
- retention: of the items the base model got right, the share still right (so the base
  row is 100% by construction), beside the raw scores;
- MMLU: accuracy of the option with the highest mean log-prob per token (cloze style);
- perplexity on Wikipedia passages (BoolQ), with the change against the base and its
  standard error, paired over passages.
Task learning: accuracy on the held-out ASDiv split (the first number of the greedy answer
against the gold number) and the held-out answer loss (NLL per answer token).
The toy suite measures the same two things on the toy world (loranull_mini/toy.py):
retention of held-out facts and the accuracy / loss on the new skill.

Fairness, fixed before any result was seen: every method gets the same data, steps, batch,
rank, alpha, targets and seeds. The learning rate is chosen per method from the same grid
by one rule: the lowest mean validation loss over seeds, ties to the smaller lr. The
validation examples are carved from the TRAIN split and never trained on (ASDiv: the last
rows of the train split, inside the tenth train.py holds out; toy: entities of their own),
so the test splits that the tables report play no part in the choice. The whole grid is in
the report.

Diagnostics: effective rank of the calibration activations against the weights, layer by
layer (is the paper's premise true for this model?); covariance spectra; the share of
calibration energy each method's A reads; the knowledge disturbance ||dW X|| / ||W X||
over training (logged by train.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before torch loads: spinning OpenMP threads slow everything down on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import lora  # noqa: E402
import nullspace  # noqa: E402
import train  # noqa: E402
from loranull_mini import adapter_io, calibration, metrics  # noqa: E402
from loranull_mini import data as datasets  # noqa: E402
from loranull_mini.data import Example  # noqa: E402
from model import PROJECTIONS  # noqa: E402

# table label -> (init, LoRA-Null v2 = A frozen)
METHODS = {
    "vanilla": ("vanilla", False), "pissa": ("pissa", False), "milora": ("milora", False),
    "corda": ("corda", False), "null": ("null", False), "null-v2": ("null", True),
}
LABELS = {"base": "base model", "vanilla": "LoRA", "pissa": "PiSSA", "milora": "MiLoRA",
          "corda": "CorDA-KPA", "null": "LoRA-Null v1", "null-v2": "LoRA-Null v2"}

# Each suite's budget and evaluation sizes. The learning-rate grid and the seeds are part
# of the budget: every method gets the same ones.
SUITES = {
    "toy": dict(
        lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), steps=100, batch_size=32,
        evaluate_grid=True,          # evaluate every grid point (cheap here), not only the chosen lr
        train=dict(preset="toy", eval_every=25, eval_examples=64, ckpt_every=100)),
    "real": dict(
        lrs=(5e-4, 2e-3), seeds=(0,), steps=30, batch_size=8, evaluate_grid=False,
        nq=200, nq_generate=64, distractors=3, mmlu=80, wiki=40, wiki_tokens=256, math=64, val=48,
        train=dict(preset="real", eval_every=10, eval_examples=8, ckpt_every=10,
                   calib_samples=16, calib_len=256)),
    "real-quick": dict(
        lrs=(1e-3,), seeds=(0,), steps=6, batch_size=4, evaluate_grid=False,
        nq=32, nq_generate=16, distractors=3, mmlu=16, wiki=8, wiki_tokens=192, math=16, val=16,
        train=dict(preset="real", eval_every=6, eval_examples=4, ckpt_every=6,
                   calib_samples=16, calib_len=128)),
}


@dataclass
class EvalConfig:
    suite: str = field(default="", metadata={"help": "run a whole comparison: toy or real "
                                                     "(without it: evaluate --model / --adapter)",
                                             "choices": ["", "toy", "real"]})
    quick: bool = field(default=False, metadata={"help": "smaller real suite / evaluation sets (a smoke run)"})
    model: str = field(default="", metadata={"help": "checkpoint (.gguf, HF or Meta directory), 'toy' for the "
                                                     "toy model; default SmolLM2-135M-Instruct"})
    adapter: str = field(default="", metadata={"help": "adapter directory (train.py's OUT/adapter) to evaluate"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/eval-<suite>)"})
    methods: str = field(default=",".join(METHODS), metadata={"help": "comma-separated methods of the suite"})
    lrs: str = field(default="", metadata={"help": "comma-separated learning-rate grid (default: the suite's)"})
    seeds: str = field(default="", metadata={"help": "comma-separated seeds (default: the suite's)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps per run (default: the suite's)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: 1 for the toy model, torch's default otherwise)"})


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    return EvalConfig(**vars(parser.parse_args(argv)))


def suite_settings(cfg: EvalConfig) -> dict:
    """The suite's preset with the command line's overrides applied."""
    s = copy.deepcopy(SUITES["real-quick" if cfg.suite == "real" and cfg.quick else cfg.suite])
    if cfg.lrs:
        s["lrs"] = tuple(float(x) for x in cfg.lrs.split(","))
    if cfg.seeds:
        s["seeds"] = tuple(int(x) for x in cfg.seeds.split(","))
    if cfg.steps:
        s["steps"] = cfg.steps
    s["methods"] = tuple(m.strip() for m in cfg.methods.split(",") if m.strip())
    unknown = [m for m in s["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return s


# ----------------------------------------------------------------------------- benchmarks
# Each benchmark is prepared once (token ids) and then scored on any model:
# run(model, tok, prepared) -> {"scores": {name: number}, "items": {name: per-item list}}.
def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def answer_loss_examples(tok, rows) -> list[Example]:
    """Question in the chat template, answer + end-of-turn scored: the training loss."""
    return [datasets.encode_qa(tok, r["question"], r["answer"]) for r in rows]


def mean_answer_nll(model, examples: list[Example]) -> float:
    """NLL per answer token over all examples (token-weighted, as train.py's held-out loss)."""
    nll, count = metrics.answer_nll(model, examples)
    return sum(nll) / max(sum(count), 1)


def qa_accuracy(model, tok, rows, max_new_tokens, stop_strings=(), is_right=None) -> list[bool]:
    """Greedy answers to chat-template questions, judged by is_right(text, row)."""
    prompts = [tok.encode_chat([{"role": "user", "content": r["question"]}]) for r in rows]
    texts = metrics.greedy_generate(model, tok, prompts, max_new_tokens, stop_strings)
    return [bool(is_right(t, r)) for t, r in zip(texts, rows)]


def prepare_toy(tok) -> dict:
    from loranull_mini import toy
    return {"facts": toy.heldout_facts(), "skill": toy.skill_task("test")}


def run_toy(model, tok, prep) -> dict:
    """Held-out facts (accuracy, answer NLL) and the new skill (accuracy, loss)."""
    exact = lambda text, row: text.strip() == row["answer"]          # noqa: E731
    facts = qa_accuracy(model, tok, prep["facts"], 3, is_right=exact)
    skill = qa_accuracy(model, tok, prep["skill"], 3, is_right=exact)
    return {"scores": {"fact_acc": mean(facts),
                       "fact_nll": mean_answer_nll(model, answer_loss_examples(tok, prep["facts"])),
                       "skill_acc": mean(skill),
                       "skill_loss": mean_answer_nll(model, answer_loss_examples(tok, prep["skill"]))},
            "items": {"fact": facts, "skill": skill}}


def nq_prompt(question: str) -> str:
    """The usual closed-book NQ-open prompt, as plain text (no chat template)."""
    return f"Q: {question.strip().rstrip('?')}?\nA:"


def prepare_real(tok, s: dict) -> dict:
    """NQ-open held-out questions with distractors, MMLU, Wikipedia passages, ASDiv test."""
    pool = datasets.nq_open("heldout")
    nq = pool[:s["nq"]]
    for i, row in enumerate(nq):                  # distractors: other questions' answers, fixed
        rng = random.Random(1000 + i)
        gold = {metrics.normalize_answer(a) for a in row["answers"]}
        row["distractors"] = []
        while len(row["distractors"]) < s["distractors"]:
            other = rng.choice(pool)["answers"][0]
            if metrics.normalize_answer(other) not in gold and other not in row["distractors"]:
                row["distractors"].append(other)
    math_rows = [r for r in datasets.asdiv("test") if metrics.parse_number(r["number"]) is not None]
    passages = datasets.wiki_passages(s["wiki"])
    return {
        "nq": nq, "nq_generate": s["nq_generate"], "mmlu": short_mmlu(tok, s["mmlu"]), "math": math_rows[:s["math"]],
        "wiki": [Example(tok.encode(p)[:s["wiki_tokens"]], 1) for p in passages],
    }


def mmlu_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def short_mmlu(tok, n: int, max_prompt: int = 96, max_option: int = 24) -> list[dict]:
    """The first n MMLU items (fixed order) whose prompt and options are short: scoring
    cost grows with their length, and a few items run to hundreds of tokens."""
    return [r for r in datasets.mmlu(10 ** 6) if len(tok.encode(mmlu_prompt(r["question"]))) <= max_prompt
            and max(len(tok.encode(" " + o)) for o in r["options"]) <= max_option][:n]


def per_token_means(logprobs: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(lp) / len(lp) for lp in options] for options in logprobs]


def run_nq(model, tok, rows, n_generate: int) -> dict:
    """Exact match on the first n_generate questions (it is ~0 for a model this small; kept
    to compare with the paper), contrastive likelihood on all."""
    prompts = [tok.encode(nq_prompt(r["question"])) for r in rows]
    answers = metrics.greedy_generate(model, tok, prompts[:n_generate], 10, stop_strings=("\n", ".", ","))
    em = [metrics.exact_match(a, r["answers"]) for a, r in zip(answers, rows)]
    # candidate 0 is the gold answer (its first alias), then the distractors
    options = [[tok.encode(" " + c.strip()) for c in [r["answers"][0]] + r["distractors"]] for r in rows]
    scores = per_token_means(metrics.option_logprobs(model, prompts, options))
    contrastive = [sc[0] > max(sc[1:]) for sc in scores]
    return {"scores": {"nq_em": mean(em), "nq_gold_ll": mean(sc[0] for sc in scores),
                       "nq_contrastive_acc": mean(contrastive),
                       "nq_margin": mean(sc[0] - max(sc[1:]) for sc in scores)},
            "items": {"nq_em": em, "nq_contrastive": contrastive, "nq_answers": answers}}


def run_mmlu(model, tok, rows) -> dict:
    prompts = [tok.encode(mmlu_prompt(r["question"])) for r in rows]
    options = [[tok.encode(" " + o) for o in r["options"]] for r in rows]
    scores = per_token_means(metrics.option_logprobs(model, prompts, options, batch_size=8))
    right = [max(range(len(sc)), key=sc.__getitem__) == r["answer"] for sc, r in zip(scores, rows)]
    return {"scores": {"mmlu_acc": mean(right)}, "items": {"mmlu": right}}


def run_wiki(model, tok, passages) -> dict:
    nll, count = metrics.sequence_nll(model, passages, tok.pad_id, batch_size=8)
    mean_nll = sum(nll) / sum(count)
    return {"scores": {"wiki_nll": mean_nll, "wiki_ppl": math.exp(mean_nll)},
            "items": {"wiki_nll": nll, "wiki_tokens": count}}


def run_math(model, tok, rows) -> dict:
    right = qa_accuracy(model, tok, rows, 20, is_right=lambda text, row: metrics.same_number(
        metrics.extract_number(text), metrics.parse_number(row["number"])))
    return {"scores": {"math_acc": mean(right),
                       "math_loss": mean_answer_nll(model, answer_loss_examples(tok, rows))},
            "items": {"math": right}}


def evaluate(model, tok, prep: dict) -> dict:
    """Every prepared benchmark on one model: {"scores": {...}, "items": {...}, "seconds"}."""
    t0 = time.time()
    if "facts" in prep:
        parts = [run_toy(model, tok, prep)]
    else:
        parts = [run_nq(model, tok, prep["nq"], prep["nq_generate"]), run_mmlu(model, tok, prep["mmlu"]),
                 run_wiki(model, tok, prep["wiki"]), run_math(model, tok, prep["math"])]
    out = {"scores": {}, "items": {}}
    for p in parts:
        out["scores"].update(p["scores"])
        out["items"].update(p["items"])
    out["seconds"] = time.time() - t0
    return out


def compare_to_base(ev: dict, base: dict) -> dict:
    """Scores that need the base model's items: retention on what the base got right, and
    the paired perplexity change."""
    out = {}
    for key in ("fact", "nq_em", "nq_contrastive", "mmlu"):
        if key in ev["items"]:
            out[f"{key}_retention"], out[f"{key}_retention_n"] = metrics.retention(ev["items"][key], base["items"][key])
    if "wiki_nll" in ev["items"]:
        delta, se = metrics.paired_nll_difference(ev["items"]["wiki_nll"], base["items"]["wiki_nll"],
                                                  ev["items"]["wiki_tokens"])
        out["wiki_dnll"], out["wiki_dnll_se"] = delta, se
        out["wiki_ppl_change"] = math.exp(delta) - 1          # relative perplexity change
    return out


# ----------------------------------------------------------------------------- one training run
def atomic_json(path: Path, obj):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def captured_energies(layers: dict, covariances: dict, method: str, seed: int) -> dict:
    """Mean over layers of trace(P_A C) / trace(C) for A at the init and after training.

    The init's A is the stored A0 where the init moved weight into the adapter; vanilla's
    random A is drawn again exactly as lora.inject_lora draws it (one generator seeded
    with the run's seed, layers in order)."""
    generator = torch.Generator().manual_seed(seed)
    init, final = {}, {}
    for name, layer in layers.items():
        if method == "vanilla":
            A0, _, _ = lora.vanilla_init(layer.base.weight, layer.r, layer.alpha, generator=generator)
        else:
            A0 = layer.A0 if layer.A0 is not None else layer.A
        C = covariances[name]
        init[name] = nullspace.captured_energy(A0.detach().cpu().float(), C.cpu())
        final[name] = nullspace.captured_energy(layer.A.detach().cpu().float(), C.cpu())
    return {"init": mean(init.values()), "final": mean(final.values()),
            "init_by_layer": init, "final_by_layer": final}


def train_run(s: dict, method: str, lr: float, seed: int, run_dir: Path, val: list[Example],
              device: str, data_file: str, quiet: bool) -> dict:
    """Fine-tune one (method, lr, seed) with train.py; returns (and caches in run.json) the
    validation loss, the disturbance over training and the captured energies."""
    cached = read_json(run_dir / "run.json")
    if cached is not None:
        return cached
    init, v2 = METHODS[method]
    run_dir.mkdir(parents=True, exist_ok=True)
    preset = train.PRESETS.get(s["train"]["preset"], {})
    cfg = train.TrainConfig(**{**preset, **s["train"], "init": init, "freeze_a": v2, "lr": lr, "seed": seed,
                               "steps": s["steps"], "batch_size": s["batch_size"], "out": str(run_dir),
                               "device": device, "data": data_file,
                               "resume": (run_dir / "checkpoint.pt").is_file()})
    t0 = time.time()
    summary = {"method": method, "lr": lr, "seed": seed}
    try:
        with contextlib.ExitStack() as stack:
            if quiet:                                   # train.py's log goes to a file
                log = stack.enter_context(open(run_dir / "train.log", "a"))
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            result = train.main(cfg)
    except FloatingPointError as e:                   # a diverged run stays in the grid as a failure
        summary.update(failed=str(e), val_loss=float("inf"))
        atomic_json(run_dir / "run.json", summary)
        return summary
    model = result["model"]
    rows = result["metrics"]
    summary.update(
        train_seconds=time.time() - t0,
        val_loss=mean_answer_nll(model, val),
        train_loss=mean(r["loss"] for r in rows[-max(1, len(rows) // 10):]),
        disturbance=[[r["step"], r["disturbance"]] for r in rows if "disturbance" in r],
        energy=captured_energies(result["layers"], result["covariances"], method, seed))
    atomic_json(run_dir / "run.json", summary)
    return summary


def select_lr(runs: list[dict], lrs) -> tuple[float, dict]:
    """The rule, fixed in advance: the lr with the lowest mean validation loss over seeds
    (ties to the smaller lr). Returns (lr, {lr: (mean, std, n)})."""
    grid = {}
    for lr in lrs:
        losses = [r["val_loss"] for r in runs if r["lr"] == lr]
        grid[lr] = (*metrics.mean_std(losses), len(losses))
    finite = [lr for lr in sorted(lrs) if math.isfinite(grid[lr][0])]
    if not finite:
        raise FloatingPointError("every learning rate of the grid diverged")
    return min(finite, key=lambda lr: grid[lr][0]), grid


def evaluate_run(run_dir: Path, base_model, tok, prep: dict, base_eval: dict) -> dict:
    """Evaluate base + the run's saved adapter (cached in eval.json)."""
    cached = read_json(run_dir / "eval.json")
    if cached is not None:
        return cached
    model = copy.deepcopy(base_model)
    adapter_io.load_adapter(model, run_dir / "adapter")
    ev = evaluate(model, tok, prep)
    ev["scores"].update(compare_to_base(ev, base_eval))
    atomic_json(run_dir / "eval.json", ev)
    return ev


# ----------------------------------------------------------------------------- diagnostics
def diagnostics(model, covariances: dict) -> dict:
    """Per block: effective rank (entropy erank, n90, n99) of each distinct layer input
    (from its covariance) and of each weight; eigenvalue spectra of three blocks."""
    n_layers = len(model.layers)
    show = sorted({0, n_layers // 2, n_layers - 1})
    seen, acts, weights, spectra = set(), [], [], {}
    for name, C in covariances.items():
        block = int(name.split(".")[1])
        proj = name.split(".")[-1]
        W = model.get_submodule(name).weight
        weights.append({"block": block, "proj": proj, **nullspace.effective_rank(nullspace.weight_singular_values(W))})
        if id(C) in seen:                             # q/k/v (and gate/up) share one input
            continue
        seen.add(id(C))
        sv = nullspace.activation_singular_values(C)
        acts.append({"block": block, "input_of": proj, "dim": C.shape[0], **nullspace.effective_rank(sv)})
        if block in show:
            spectra[f"{block}.{proj}"] = (sv ** 2 / (sv ** 2).max()).tolist()   # eigenvalues of C, normalised
    return {"activations": acts, "weights": weights, "spectra": spectra}


# ----------------------------------------------------------------------------- the suite
def load_base(s: dict, device: str, data_file: str):
    """Base model, tokenizer and calibration windows exactly as train.py builds them."""
    cfg = train.TrainConfig(**{**train.PRESETS.get(s["train"]["preset"], {}), **s["train"], "data": data_file})
    with contextlib.redirect_stdout(sys.stderr):
        model, tok, data = train.load_model_and_data(cfg, print)
    return model.to(device).eval(), tok, (data.calibration, data.calibration_mask), cfg


def check_settings(out: Path, settings: dict):
    """A suite folder holds one set of settings: resuming with others would mix budgets."""
    path = out / "settings.json"
    old = read_json(path)
    if old is not None and old != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds a suite with other settings ({path}); choose another --out "
                         f"or delete it")
    atomic_json(path, settings)


def run_suite(cfg: EvalConfig) -> dict:
    s = suite_settings(cfg)
    name = cfg.suite + ("-quick" if cfg.quick and cfg.suite == "real" else "")
    out = Path(cfg.out or f"runs/eval-{name}")
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {"suite": name, **s})
    device = pick_device(cfg.device)
    t_start = time.time()
    quiet = cfg.suite == "toy"

    # the data: the training rows go to a file, whose last tenth train.py holds out; the
    # validation examples are the last rows of that tenth (never trained on)
    data_file = ""
    if cfg.suite == "real":
        rows = datasets.asdiv("train")
        assert s["val"] <= len(rows) // 10, "validation must lie inside the tenth train.py holds out"
        data_file = str(out / "asdiv-train.jsonl")
        if not Path(data_file).is_file():
            tmp = Path(data_file + ".tmp")
            tmp.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
            os.replace(tmp, data_file)
    base_model, tok, calib, train_cfg = load_base(s, device, data_file)
    if cfg.suite == "toy":
        from loranull_mini import toy
        val = answer_loss_examples(tok, toy.skill_task("val"))
        prep = prepare_toy(tok)
    else:
        val = answer_loss_examples(tok, datasets.asdiv("train")[-s["val"]:])
        prep = prepare_real(tok, s)

    # 1. the base model
    base_eval = read_json(out / "base.json")
    if base_eval is None:
        base_eval = evaluate(base_model, tok, prep)
        base_eval["scores"].update(compare_to_base(base_eval, base_eval))
        base_eval["val_loss"] = mean_answer_nll(base_model, val)
        atomic_json(out / "base.json", base_eval)
    say(f"base model: {fmt_scores(base_eval['scores'])} ({base_eval['seconds']:.0f}s)")
    diag = read_json(out / "diagnostics.json")
    if diag is None:
        targets = [t.strip() for t in train_cfg.targets.split(",")]
        covariances = calibration.calibrate_blockwise(base_model, train.calibration_batches(*calib, 0, 1), targets)
        diag = diagnostics(base_model, covariances)
        del covariances
        atomic_json(out / "diagnostics.json", diag)

    # 2. the grid: every method x lr x seed, then the lr rule, then evaluation
    runs, evals, selected, grids = [], {}, {}, {}
    for method in s["methods"]:
        method_runs = []
        for lr in s["lrs"]:
            for seed in s["seeds"]:
                run_dir = out / "runs" / method / f"lr{lr:g}-seed{seed}"
                r = train_run(s, method, lr, seed, run_dir, val, cfg.device, data_file, quiet)
                r["dir"] = str(run_dir)
                method_runs.append(r)
                if s["evaluate_grid"] and "failed" not in r:
                    evals[run_dir] = evaluate_run(run_dir, base_model, tok, prep, base_eval)
                say(f"{method:8s} lr {lr:g} seed {seed}: val loss {r['val_loss']:.4f}"
                    + (f", {fmt_scores(evals[run_dir]['scores'])}" if run_dir in evals else ""))
        selected[method], grids[method] = select_lr(method_runs, s["lrs"])
        for r in method_runs:
            r["selected"] = r["lr"] == selected[method]
            if r["selected"] and "failed" not in r and Path(r["dir"]) not in evals:
                evals[Path(r["dir"])] = evaluate_run(Path(r["dir"]), base_model, tok, prep, base_eval)
                say(f"{method:8s} lr {r['lr']:g} seed {r['seed']}: {fmt_scores(evals[Path(r['dir'])]['scores'])}")
            if Path(r["dir"]) in evals:
                r["scores"] = evals[Path(r["dir"])]["scores"]
                r["eval_seconds"] = evals[Path(r["dir"])]["seconds"]
        say(f"{method:8s} chose lr {selected[method]:g}")
        runs += method_runs

    # 3. report
    results = {"suite": name, "settings": s, "base": {k: v for k, v in base_eval.items() if k != "items"},
               "runs": runs, "selected": selected,
               "grid": {m: {f"{lr:g}": dict(zip(("val_loss_mean", "val_loss_std", "n"), g)) for lr, g in grid.items()}
                        for m, grid in grids.items()},
               "table": summary_rows(base_eval, runs, s["methods"]), "diagnostics": diag,
               "seconds": time.time() - t_start}
    atomic_json(out / "results.json", results)
    write_markdown(out / "results.md", results)
    write_plots(out, results)
    say(f"wrote {out}/results.md, results.json and plots in {results['seconds']:.0f}s")
    return results


# ----------------------------------------------------------------------------- tables
# (key, column title, scale, decimals) of the table columns, per suite
TOY_COLUMNS = [("fact_retention", "fact retention %", 100, 1), ("fact_acc", "fact acc %", 100, 1),
               ("fact_nll", "fact NLL", 1, 3), ("skill_acc", "skill acc %", 100, 1),
               ("skill_loss", "skill loss", 1, 3)]
KNOWLEDGE_COLUMNS = [("nq_em", "NQ EM %", 100, 1), ("nq_em_retention", "NQ EM ret. %", 100, 1),
                     ("nq_contrastive_acc", "NQ contr. acc %", 100, 1),
                     ("nq_contrastive_retention", "NQ contr. ret. %", 100, 1),
                     ("nq_margin", "NQ margin", 1, 3), ("nq_gold_ll", "NQ gold LL", 1, 3),
                     ("mmlu_acc", "MMLU %", 100, 1), ("mmlu_retention", "MMLU ret. %", 100, 1),
                     ("wiki_ppl", "wiki ppl", 1, 2), ("wiki_ppl_change", "wiki ppl change %", 100, 2)]
TASK_COLUMNS = [("math_acc", "ASDiv acc %", 100, 1), ("math_loss", "ASDiv loss", 1, 3)]


def summary_rows(base_eval: dict, runs: list[dict], methods) -> list[dict]:
    """One row per method at its chosen lr: mean and std over seeds of every score."""
    rows = [{"method": "base", "lr": None, "n_seeds": 1, "val_loss": [base_eval["val_loss"], 0.0],
             **{k: [v, 0.0] for k, v in base_eval["scores"].items()}}]
    for m in methods:
        chosen = [r for r in runs if r["method"] == m and r["selected"] and "scores" in r]
        if not chosen:
            continue
        row = {"method": m, "lr": chosen[0]["lr"], "n_seeds": len(chosen),
               "val_loss": list(metrics.mean_std(r["val_loss"] for r in chosen))}
        for key in chosen[0]["scores"]:
            row[key] = list(metrics.mean_std(r["scores"][key] for r in chosen))
        if "wiki_dnll_se" in chosen[0]["scores"]:          # per-passage SE, averaged over seeds
            row["wiki_dnll_se"] = [mean(r["scores"]["wiki_dnll_se"] for r in chosen), 0.0]
        rows.append(row)
    return rows


def cell(row: dict, key: str, scale: float, decimals: int, base: dict | None) -> str:
    if key not in row or row[key][0] is None or (isinstance(row[key][0], float) and math.isnan(row[key][0])):
        return "–"
    m, sd = row[key][0] * scale, row[key][1] * scale
    text = f"{m:.{decimals}f}"
    if row["n_seeds"] > 1:
        text += f" ± {sd:.{decimals}f}"
    if base is not None and key in base and not key.endswith(("retention", "change")):
        text += f" ({m - base[key][0] * scale:+.{decimals}f})"
    return text


def markdown_table(rows: list[dict], columns) -> str:
    head = ["method", "lr"] + [c[1] for c in columns] + ["val loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for row in rows:
        ref = None if row is base else base
        cells = [LABELS.get(row["method"], row["method"]), "–" if row["lr"] is None else f"{row['lr']:g}"]
        cells += [cell(row, key, scale, dec, ref) for key, _, scale, dec in columns]
        cells.append(cell(row, "val_loss", 1, 4, ref))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict):
    rows, s = results["table"], results["settings"]
    toy = results["suite"] == "toy"
    seeds = len(s["seeds"])
    parts = [f"# Suite `{results['suite']}`", "",
             f"Every method: {s['steps']} steps of batch {s['batch_size']}, seeds {list(s['seeds'])}, "
             f"lr chosen from {list(s['lrs'])} by the lowest mean validation loss. "
             f"Cells: mean{' ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ''} "
             f"(change against the base model). Retention = share of the items the base model "
             f"got right that are still right.", ""]
    if toy:
        parts += ["## Knowledge retention and the new skill", "", markdown_table(rows, TOY_COLUMNS), ""]
    else:
        parts += ["## Knowledge retention", "", markdown_table(rows, KNOWLEDGE_COLUMNS), "",
                  "wiki ppl change: exp(mean NLL change per token) - 1 against the base; its standard "
                  "error (paired over passages, per-token NLL):", ""]
        parts += [f"- {LABELS[r['method']]}: {100 * r['wiki_ppl_change'][0]:+.2f}% "
                  f"(NLL change {r['wiki_dnll'][0]:+.4f} ± {r['wiki_dnll_se'][0]:.4f} nats/token)"
                  for r in rows[1:] if "wiki_dnll" in r]
        parts += ["", "## Task", "", markdown_table(rows, TASK_COLUMNS), ""]
    parts += ["## Learning-rate grid (validation loss, mean ± std over seeds; chosen in bold)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in s["lrs"]) + " |",
              "|---|" + "---|" * len(s["lrs"])]
    for m, grid in results["grid"].items():
        cells = []
        for lr in s["lrs"]:
            g = grid[f"{lr:g}"]
            text = f"{g['val_loss_mean']:.4f}" + (f" ± {g['val_loss_std']:.4f}" if g["n"] > 1 else "")
            cells.append(f"**{text}**" if lr == results["selected"][m] else text)
        parts.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    energy = {m: [r["energy"] for r in results["runs"] if r["method"] == m and r["selected"] and "energy" in r]
              for m in results["selected"]}
    parts += ["", "## Calibration energy read by A (trace(P_A C) / trace(C), mean over layers)", "",
              "| method | at init | after training |", "|---|---|---|"]
    parts += [f"| {LABELS[m]} | {mean(e['init'] for e in es):.2e} | {mean(e['final'] for e in es):.2e} |"
              for m, es in energy.items() if es]
    parts += ["", f"Total time {results['seconds'] / 60:.1f} min.", "",
              "Plots: tradeoff.png, effective_rank.png, spectra.png, energy.png, disturbance.png."]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- plots
def save_figure(fig, path: Path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_plots(out: Path, results: dict):
    import matplotlib
    matplotlib.use("Agg")
    plot_tradeoff(out / "tradeoff.png", results)
    plot_effective_rank(out / "effective_rank.png", results["diagnostics"])
    plot_spectra(out / "spectra.png", results["diagnostics"])
    plot_energy(out / "energy.png", results)
    plot_disturbance(out / "disturbance.png", results)


def plot_tradeoff(path: Path, results: dict):
    """Retention against task gain: every evaluated run faint, each method's chosen lr bold."""
    import matplotlib.pyplot as plt
    toy = results["suite"] == "toy"
    base = results["base"]["scores"]
    x_of = (lambda sc: 100 * (sc["skill_acc"] - base["skill_acc"])) if toy else \
           (lambda sc: base["math_loss"] - sc["math_loss"])
    panels = [("fact_retention", "held-out fact retention %", 100)] if toy else \
             [("nq_contrastive_retention", "NQ-open contrastive retention %", 100),
              ("wiki_ppl_change", "Wikipedia perplexity change %", 100)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title, scale) in zip(axes[0], panels):
        for i, m in enumerate(results["selected"]):
            color = f"C{i}"
            mine = [r for r in results["runs"] if r["method"] == m and "scores" in r]
            for r in mine:
                if not r["selected"]:
                    ax.scatter(x_of(r["scores"]), scale * r["scores"][key], color=color, alpha=0.3, s=14)
            chosen = [r for r in mine if r["selected"]]
            if chosen:
                xs = metrics.mean_std(x_of(r["scores"]) for r in chosen)
                ys = metrics.mean_std(scale * r["scores"][key] for r in chosen)
                ax.errorbar(xs[0], ys[0], xerr=xs[1], yerr=ys[1], fmt="o", color=color, capsize=3,
                            label=f"{LABELS[m]} (lr {results['selected'][m]:g})")
        ax.scatter(0, scale * base.get(key, 0.0), marker="*", s=120, color="k", label="base model")
        ax.set_xlabel("skill accuracy gain (points)" if toy else "ASDiv answer loss decrease (nats/token)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("retention vs task gain (bold: chosen lr, mean ± std over seeds; faint: other lrs)", fontsize=9)
    save_figure(fig, path)


# module name -> short projection name ("wq" -> "q"); an input is named by the layers reading it
SHORT = {path.split(".")[-1]: short for short, path in PROJECTIONS.items()}
INPUT_NAME = {"wq": "q/k/v", "wo": "o", "w_gate": "gate/up", "w_down": "down"}


def plot_effective_rank(path: Path, diag: dict):
    """Entropy effective rank and n90 per block: activations (layer inputs) vs weights."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "erank", "entropy effective rank"), (axes[1], "n90", "components holding 90% energy")):
        for i, inp in enumerate(sorted({a["input_of"] for a in diag["activations"]})):
            pts = sorted((a["block"], a[key]) for a in diag["activations"] if a["input_of"] == inp)
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"input of {INPUT_NAME.get(inp, inp)}")
        for i, proj in enumerate(sorted({w["proj"] for w in diag["weights"]})):
            pts = sorted((w["block"], w[key]) for w in diag["weights"] if w["proj"] == proj)
            ax.plot(*zip(*pts), "x--", color=f"C{i + 4}", alpha=0.6, label=f"weight {SHORT.get(proj, proj)}")
        ax.set_xlabel("block"), ax.set_ylabel(title), ax.set_yscale("log"), ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("effective rank: calibration activations (o) vs weights (x)", fontsize=9)
    save_figure(fig, path)


def plot_spectra(path: Path, diag: dict):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ev in diag["spectra"].items():
        ax.semilogy(range(1, len(ev) + 1), [max(v, 1e-16) for v in ev], label=f"block {name}")
    ax.set_xlabel("eigenvalue index (descending)"), ax.set_ylabel("eigenvalue of C / largest")
    ax.set_title("calibration covariance spectra (inputs of q/k/v, o, gate/up, down)", fontsize=9)
    ax.legend(fontsize=6), ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_energy(path: Path, results: dict):
    import matplotlib.pyplot as plt
    methods = [m for m in results["selected"]
               if any(r["method"] == m and r["selected"] and "energy" in r for r in results["runs"])]
    vals = {when: [mean(r["energy"][when] for r in results["runs"] if r["method"] == m and r["selected"]
                        and "energy" in r) for m in methods] for when in ("init", "final")}
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], vals["init"], 0.4, label="at init")
    ax.bar([i + 0.2 for i in x], vals["final"], 0.4, label="after training")
    ax.set_xticks(list(x), [LABELS[m] for m in methods], fontsize=8)
    ax.set_yscale("log"), ax.set_ylabel("trace(P_A C) / trace(C)"), ax.legend()
    ax.set_title("share of calibration activation energy in A's row space (mean over layers)", fontsize=9)
    save_figure(fig, path)


def plot_disturbance(path: Path, results: dict):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, m in enumerate(results["selected"]):
        curves = [r["disturbance"] for r in results["runs"] if r["method"] == m and r["selected"] and r.get("disturbance")]
        if curves:
            steps = [p[0] for p in curves[0]]
            ax.plot(steps, [mean(c[j][1] for c in curves) for j in range(len(steps))], "o-", color=f"C{i}",
                    label=f"{LABELS[m]} (lr {results['selected'][m]:g})")
    ax.set_xlabel("step"), ax.set_ylabel("||dW X|| / ||W X|| on calibration inputs")
    ax.set_yscale("log"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    ax.set_title("knowledge disturbance over training (mean over layers and seeds)", fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- one model
def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def fmt_scores(scores: dict) -> str:
    keys = [k for k in ("fact_retention", "skill_acc", "nq_contrastive_acc", "mmlu_acc", "wiki_ppl",
                        "math_acc", "math_loss") if k in scores]
    return ", ".join(f"{k} {scores[k]:.3f}" for k in keys)


def say(text: str):
    print(text, flush=True)


def evaluate_one(cfg: EvalConfig) -> dict:
    """Evaluate one model (+ adapter) on the real benchmarks (or the toy world's)."""
    device = pick_device(cfg.device)
    if cfg.model == "toy":
        from loranull_mini import toy
        model, tok = toy.load_toy_model(log=lambda *a: None)
        prep = prepare_toy(tok)
    else:
        from loranull_mini.checkpoint import load_model
        model, tok = load_model(cfg.model or None, require_tokenizer=True)
        prep = prepare_real(tok, SUITES["real-quick" if cfg.quick else "real"])
    model.to(device).eval()
    if cfg.adapter:
        adapter_io.load_adapter(model, cfg.adapter)
    ev = evaluate(model, tok, prep)
    say(json.dumps({"model": cfg.model or "SmolLM2-135M-Instruct", "adapter": cfg.adapter or None,
                    **ev["scores"], "seconds": round(ev["seconds"], 1)}, indent=1))
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_json(Path(cfg.out) / "eval.json", ev)
    return ev


def main(argv=None):
    cfg = parse_args(argv) if not isinstance(argv, EvalConfig) else argv
    threads = cfg.threads or (1 if (cfg.suite == "toy" or cfg.model == "toy") else 0)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)    # the toy model is too small to gain from threads
    try:
        return run_suite(cfg) if cfg.suite else evaluate_one(cfg)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
