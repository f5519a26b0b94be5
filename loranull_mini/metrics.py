"""Scorers and batched likelihood plumbing behind eval.py.

Text scorers:
- normalize_answer / exact_match: the standard NQ-open (SQuAD) answer normalisation:
  lower case, drop punctuation, drop the articles a/an/the, collapse whitespace; a prediction
  is right when it equals any normalised alias.
- extract_number / parse_number: the number in a math answer ("29 dollars" -> 29.0,
  "3,750" -> 3750.0, "-1/3" -> -0.333..).

Model scoring (no gradients, batched, sorted by length so padding stays small):
- sequence_nll: per example, the summed NLL of its scored tokens and their count.
- option_logprobs: per prompt and each of its options, the log-probability of every option
  token. The prompt runs once; its KV cache is copied for each option (shared prefix).
  answer_nll uses it for the NLL of an answer after its prompt.
- greedy_generate: batched greedy continuation, cut at stop strings; chat_answers: the
  model's greedy chat-template answers as token ids (the chat probe, chat calibration).
- choice_scores / option_kl: lm-eval-harness multiple-choice scoring (acc, acc_norm) and the
  KL of an item's option distribution against the base model's.
- answer_logprobs / digit_split: per-token answer log-probs, and the answer loss split
  into tokens holding a digit and the others.
Where only the last position's logits are needed (a prompt, generation), the output
projection runs on the last position only (last_position_logits): on a 49k vocabulary it
is a fifth of the model's work per token.

Statistics: mean and spread over seeds, retention on the items a reference got right, the
standard error of a token-weighted paired difference, and the number of items a stated
precision needs (items_for_precision).
"""
from __future__ import annotations

import contextlib
import math
import re
import string

import torch
import torch.nn.functional as F

from loranull_mini.data import Example, answer_positions, chat_windows, collate, nq_open
from model import KVCache, cut_at_stop, generate

# ----------------------------------------------------------------------------- text scorers
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The NQ-open / SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """True when the normalised prediction equals any normalised alias."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


# a number: optional sign, digits with optional thousands commas, decimals, or a fraction
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _to_float(token: str) -> float | None:
    token = token.replace(",", "")
    if "/" in token:
        num, den = token.split("/")
        return float(num) / float(den) if float(den) != 0 else None
    return float(token)


def parse_number(text: str) -> float | None:
    """The value of a text that is exactly one number (a gold answer), else None."""
    text = text.strip()
    return _to_float(text) if NUMBER.fullmatch(text) else None


def extract_number(text: str) -> float | None:
    """The first number in a generated answer ("29 dollars" -> 29.0), or None."""
    match = NUMBER.search(text)
    return _to_float(match.group()) if match else None


def same_number(a: float | None, b: float | None, rel_tol: float = 1e-4) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


# ----------------------------------------------------------------------------- statistics
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def retention(correct: list[bool], reference: list[bool]) -> tuple[float, int]:
    """Share of the items the reference got right that are still right, and how many
    items that is (nan when the reference got none right)."""
    kept = [c for c, r in zip(correct, reference, strict=True) if r]
    return (sum(kept) / len(kept) if kept else float("nan")), len(kept)


def paired_nll_difference(nll: list[float], nll_ref: list[float], counts: list[int]) -> tuple[float, float]:
    """Token-weighted mean NLL difference (per token) against a reference on the same
    texts, and its standard error over texts.

    delta = sum_i w_i d_i with d_i = (nll_i - nll_ref_i) / n_i and w_i = n_i / sum(n):
    exactly mean NLL minus reference mean NLL. SE of a weighted mean of independent texts:
    sqrt(n / (n - 1) * sum_i w_i^2 (d_i - delta)^2).
    """
    total = sum(counts)
    d = [(a - b) / n for a, b, n in zip(nll, nll_ref, counts, strict=True)]
    w = [n / total for n in counts]
    delta = sum(wi * di for wi, di in zip(w, d))
    k = len(d)
    if k < 2:
        return delta, float("nan")
    var = k / (k - 1) * sum(wi ** 2 * (di - delta) ** 2 for wi, di in zip(w, d))
    return delta, math.sqrt(var)


def items_for_precision(values: list[float], rel_se: float = 0.1) -> int:
    """How many items make the standard error of the mean a fraction rel_se of the mean,
    from a pilot sample of per-item values: SE = sd / sqrt(n), so n = (sd / (rel_se mean))^2
    (rounded up; at least the 2 a standard deviation needs)."""
    mean, sd = mean_std(values)
    if len(values) < 2 or mean == 0:
        raise ValueError("items_for_precision needs at least 2 values with a non-zero mean")
    return max(2, math.ceil((sd / (rel_se * abs(mean))) ** 2 - 1e-9))  # 1e-9: 50.000000001 is 50


# ----------------------------------------------------------------------------- model scoring
def _device(model):
    return next(model.parameters()).device


def _by_length(lengths: list[int], batch_size: int, max_tokens: int = 4096) -> list[list[int]]:
    """Index batches of similar lengths, longest first: at most batch_size rows and at most
    max_tokens padded positions per batch (a few long rows do not pad a whole batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[current[0]] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@torch.no_grad()
def sequence_nll(model, examples: list[Example], pad_id: int, batch_size: int = 16,
                 max_len: int | None = None) -> tuple[list[float], list[int]]:
    """Per example: summed NLL (nats) of the tokens after its prompt, and their count.

    An Example(ids, n_prompt) scores tokens n_prompt..end (for plain text use n_prompt=1:
    every token but the first, which has no context). Examples longer than max_len + 1
    tokens keep their end (as in training).
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    nll, count = [0.0] * len(examples), [0] * len(examples)
    for rows in _by_length([len(e.ids) for e in examples], batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id, max_len).items()}
        logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"])                 # (B, T, V)
        per_token = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten().clamp(min=0),
                                    reduction="none").view_as(batch["targets"])    # (B, T)
        mask = batch["loss_mask"] * (batch["targets"] != -100)
        for b, i in enumerate(rows):
            nll[i] = float((per_token[b] * mask[b]).sum())
            count[i] = int(mask[b].sum())
    model.train(was_training)
    return nll, count


# ----------------------------------------------------------------------------- against the base model
@torch.no_grad()
def reference_distributions(model, examples: list[Example], pad_id: int, k: int = 512,
                            batch_size: int = 16) -> list[dict]:
    """The model's next-token distributions at every scored position of every example,
    kept for a later KL: per example {"top": (N, k) ids of the k most likely tokens,
    "logp": (N, k) their log-probs, "tail": (N,) the log of the probability of all other
    tokens (-inf when k covers the vocabulary), "nll": (N,) the NLL of the actual next token}.

    Keeping the top k of a 49k vocabulary, plus one bin for the rest, makes the KL of
    kl_to_reference the KL between the two distributions coarsened to k + 1 outcomes: a
    lower bound of the full KL, equal to it when k covers the vocabulary (tested).
    """
    out = [None] * len(examples)
    for rows, logp, mask, targets in _scored_logprobs(model, examples, pad_id, batch_size):
        top_logp, top = logp.topk(min(k, logp.shape[-1]), dim=-1)                 # (B, T, k)
        nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]           # (B, T)
        for b, i in enumerate(rows):
            keep = mask[b]
            out[i] = {"top": top[b][keep].to(torch.int32).cpu(), "logp": top_logp[b][keep].cpu(),
                      "tail": log_mass_outside(logp[b][keep], top[b][keep]).cpu(), "nll": nll[b][keep].cpu()}
    return out


@torch.no_grad()
def kl_to_reference(model, examples: list[Example], pad_id: int, reference: list[dict],
                    batch_size: int = 16) -> dict[str, list[float]]:
    """Per example, summed over its scored tokens: KL(reference || model) and the NLL change
    (model minus reference), and the token count. reference from reference_distributions.

    Per position, with the reference's top-k tokens I and the rest lumped into one outcome:
        KL = sum_I p_ref (log p_ref - log p) + p_ref(rest) (log p_ref(rest) - log p(rest))
    """
    kl, dnll, count = [0.0] * len(examples), [0.0] * len(examples), [0] * len(examples)
    for rows, logp, mask, targets in _scored_logprobs(model, examples, pad_id, batch_size):
        nll_all = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]       # (B, T)
        for b, i in enumerate(rows):
            ref, lp = reference[i], logp[b][mask[b]]                                # (N, V)
            top = ref["top"].to(lp.device).long()                                  # (N, k)
            ref_logp, logp_top = ref["logp"].to(lp.device).double(), lp.gather(-1, top).double()
            terms = (ref_logp.exp() * (ref_logp - logp_top)).sum(-1)
            ref_tail, tail = ref["tail"].to(lp.device).double(), log_mass_outside(lp, top).double()
            terms = terms + torch.where(torch.isinf(ref_tail), 0.0, ref_tail.exp() * (ref_tail - tail))
            nll = nll_all[b][mask[b]].double()
            kl[i], dnll[i] = float(terms.sum()), float((nll - ref["nll"].to(nll.device)).sum())
            count[i] = int(mask[b].sum())
    return {"kl": kl, "dnll": dnll, "tokens": count}


def log_mass_outside(logp: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token not in `top`: logp (N, V), top (N, k) -> (N,).
    Summed directly over those tokens (not as 1 - the rest), so a tiny mass stays exact."""
    return logp.scatter(-1, top, float("-inf")).logsumexp(-1)


def _scored_logprobs(model, examples: list[Example], pad_id: int, batch_size: int):
    """Yield (example indices, log-probs (B, T, V) float32, scored-position mask (B, T), next
    tokens (B, T)) per batch."""
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for rows in _by_length([len(e.ids) for e in examples], batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()}
            logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"])            # (B, T, V)
            mask = answer_positions(batch)
            yield rows, logits.float().log_softmax(-1), mask, batch["targets"]
    finally:
        model.train(was_training)


def option_distributions(logprobs: list[list[list[float]]]) -> list[list[float]]:
    """log p(option | prompt) renormalised over each item's options: per item, the log of
    softmax(total log-prob of each option). logprobs as from option_logprobs."""
    out = []
    for options in logprobs:
        total = torch.tensor([sum(lp) for lp in options], dtype=torch.float64)
        out.append((total - torch.logsumexp(total, 0)).tolist())
    return out


def choice_accuracy(sums: list[float], options: list[str], label: int) -> tuple[bool, bool]:
    """lm-eval-harness's acc and acc_norm of one multiple-choice item, from each option's
    summed log-likelihood: acc, the argmax of the sums is the gold; acc_norm, the argmax of
    the sums divided by the option's length in characters (lm-eval divides by len() of the
    choice string, without the space that joins it to the context; for ASCII text that is
    its byte length)."""
    per_char = [t / max(len(o), 1) for t, o in zip(sums, options, strict=True)]
    return (max(range(len(sums)), key=sums.__getitem__) == label,
            max(range(len(per_char)), key=per_char.__getitem__) == label)


@torch.no_grad()
def choice_scores(model, tok, items: list[dict], batch_size: int = 16) -> dict[str, list]:
    """Score multiple-choice items {context, options: [str], label: int} as lm-eval-harness
    does (data.benchmark builds them with its prompts). Returns, per item:
        {"logprobs": [[summed log-likelihood of each option's tokens after the context]],
         "acc": [bool], "acc_norm": [bool]}
    Each option is tokenised as " " + option (lm-eval's target delimiter); its tokens are
    scored after the context's (option_logprobs: the context runs once, KV-cached).
    """
    prompts = [tok.encode(it["context"]) for it in items]
    options = [[tok.encode(" " + o) for o in it["options"]] for it in items]
    sums = [[sum(lp) for lp in item] for item in option_logprobs(model, prompts, options, batch_size)]
    right = [choice_accuracy(s, it["options"], it["label"]) for s, it in zip(sums, items)]
    return {"logprobs": sums, "acc": [a for a, _ in right], "acc_norm": [n for _, n in right]}


def option_kl(base_logprobs: list[list[float]], tuned_logprobs: list[list[float]]) -> list[float]:
    """Per item, KL(base || tuned) of the distribution over its options: softmax of each
    option's summed log-likelihood (choice_scores' "logprobs"), renormalised over the item's
    options, of the base model and of the tuned one."""
    def log_softmax(sums):
        t = torch.tensor(sums, dtype=torch.float64)
        return (t - torch.logsumexp(t, 0)).tolist()
    return [categorical_kl(log_softmax(b), log_softmax(t)) for b, t in zip(base_logprobs, tuned_logprobs, strict=True)]


def categorical_kl(log_p: list[float], log_q: list[float]) -> float:
    """KL(p || q) of two distributions over the same outcomes, given as log-probabilities."""
    p, q = torch.tensor(log_p, dtype=torch.float64), torch.tensor(log_q, dtype=torch.float64)
    return float((p.exp() * (p - q)).sum())


class _LastPosition(torch.nn.Module):
    """Wraps the output projection: applies it to the last position only, (B, 1, V)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x[:, -1:])


@contextlib.contextmanager
def last_position_logits(model):
    """Inside this block the model returns logits for the last position only (B, 1, V)."""
    head = model.output
    model.output = _LastPosition(head)
    try:
        yield
    finally:
        model.output = head


def _select_rows(cache: KVCache, rows: list[int]) -> KVCache:
    """A new KV cache holding the given rows of `cache` (a row may repeat)."""
    index = torch.tensor(rows, device=cache.k.device)
    new = KVCache.__new__(KVCache)
    new.k, new.v = cache.k[:, index], cache.v[:, index]            # index_select copies
    new.valid, new.next_pos = cache.valid[index], cache.next_pos[index]
    new.length = cache.length
    return new


@torch.no_grad()
def option_logprobs(model, prompts: list[list[int]], options: list[list[list[int]]],
                    batch_size: int = 16, option_batch: int = 32) -> list[list[list[float]]]:
    """log p(option token | prompt, earlier option tokens) for every token of every option.

    prompts[i] is a list of token ids; options[i] a list of options (non-empty id lists).
    Returns out[i][j] = [log-prob of each token of option j of prompt i]. The prompts of a
    batch run once, left-padded, into a KV cache; the options then run right-padded after
    their prompt's cached rows, option_batch rows at a time, longest first (little
    padding). Same numbers as scoring prompt + option in full.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    out = [[None] * len(opts) for opts in options]
    for rows in _by_length([len(p) for p in prompts], batch_size):
        T0 = max(len(prompts[i]) for i in rows)
        idx = torch.zeros(len(rows), T0, dtype=torch.long)
        mask = torch.zeros(len(rows), T0, dtype=torch.bool)
        for b, i in enumerate(rows):                                   # left padding
            idx[b, T0 - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, T0 - len(prompts[i]):] = True
        longest = max(len(o) for i in rows for o in options[i])
        cache = KVCache(model.config, len(rows), T0 + longest, device, next(model.parameters()).dtype)
        with last_position_logits(model):
            logits, _ = model(idx.to(device), pad_mask=mask.to(device), cache=cache)
        first = logits[:, -1].log_softmax(-1).cpu()                     # (B, V): predicts option token 0
        flat = sorted(((b, i, j) for b, i in enumerate(rows) for j in range(len(options[i]))),
                      key=lambda f: -len(options[f[1]][f[2]]))
        for c in range(0, len(flat), option_batch):
            chunk = flat[c:c + option_batch]
            Tc = len(options[chunk[0][1]][chunk[0][2]])                  # longest option of the chunk
            cont = torch.zeros(len(chunk), Tc, dtype=torch.long)
            cont_mask = torch.zeros(len(chunk), Tc, dtype=torch.bool)
            for k, (_, i, j) in enumerate(chunk):                      # right padding
                cont[k, :len(options[i][j])] = torch.tensor(options[i][j])
                cont_mask[k, :len(options[i][j])] = True
            sub = _select_rows(cache, [b for b, _, _ in chunk])
            logits, _ = model(cont.to(device), pad_mask=cont_mask.to(device), cache=sub)  # (K, Tc, V)
            # log p of the next option token at each position: logit - logsumexp (no log_softmax copy)
            next_ids = torch.cat([cont[:, 1:], cont[:, :1]], dim=1).to(device)          # (K, Tc)
            logp = (logits.gather(-1, next_ids[..., None])[..., 0] - logits.logsumexp(-1)).cpu()
            for k, (b, i, j) in enumerate(chunk):
                o = options[i][j]
                out[i][j] = [float(first[b, o[0]])] + logp[k, :len(o) - 1].tolist()
    model.train(was_training)
    return out


def answer_logprobs(model, examples: list[Example], batch_size: int = 16) -> list[list[float]]:
    """Per example, the log-prob of each token after its prompt (option_logprobs: the
    prompt's logits are not computed)."""
    prompts = [e.ids[:e.n_prompt] for e in examples]
    answers = [[e.ids[e.n_prompt:]] for e in examples]
    return [lp[0] for lp in option_logprobs(model, prompts, answers, batch_size)]


def answer_nll(model, examples: list[Example], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Per example: summed NLL of the tokens after its prompt and their count. Equals
    sequence_nll."""
    logprobs = answer_logprobs(model, examples, batch_size)
    return [-sum(lp) for lp in logprobs], [len(lp) for lp in logprobs]


def digit_split(tok, examples: list[Example], logprobs: list[list[float]]) -> dict[str, list]:
    """The answer loss of each example split in two: the NLL of its answer tokens whose text
    holds a digit ("136" or " 1"), and of the others (units, spaces, the end of the turn).
    Returns per example {"digit_nll", "digit_tokens", "other_nll", "other_tokens"}; digit_nll +
    other_nll is the answer's summed NLL. logprobs from answer_logprobs."""
    out = {"digit_nll": [], "digit_tokens": [], "other_nll": [], "other_tokens": []}
    for e, lps in zip(examples, logprobs, strict=True):
        is_digit = [any(ch.isdigit() for ch in tok.decode([t])) for t in e.ids[e.n_prompt:]]
        out["digit_nll"].append(-sum(lp for lp, d in zip(lps, is_digit, strict=True) if d))
        out["other_nll"].append(-sum(lp for lp, d in zip(lps, is_digit) if not d))
        out["digit_tokens"].append(sum(is_digit))
        out["other_tokens"].append(len(is_digit) - sum(is_digit))
    return out


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    stop_strings=(), batch_size: int = 32) -> list[str]:
    """Greedy continuations (text), stopped at the tokenizer's stop ids or a stop string
    (the text is cut before it)."""
    was_training = model.training
    model.eval()
    texts: list = [None] * len(prompts)
    for rows in _by_length([len(p) for p in prompts], batch_size):
        with last_position_logits(model):                               # generate reads logits[:, -1]
            new = generate(model, [prompts[i] for i in rows], max_new_tokens, stop_ids=tokenizer.stop_ids,
                           stop_strings=stop_strings, tokenizer=tokenizer if stop_strings else None,
                           pad_id=tokenizer.pad_id)
        for i, ids in zip(rows, new):
            texts[i] = cut_at_stop(tokenizer.decode(ids), stop_strings)
    model.train(was_training)
    return texts


@torch.no_grad()
def chat_answers(model, tok, questions: list[str], max_new_tokens: int = 48,
                 batch_size: int = 16) -> list[list[int]]:
    """The model's greedy answer to each question asked in the chat template, as token ids,
    ending with the end-of-turn token when the model ended its turn within max_new_tokens
    (teacher-forcing these ids shows how a tuned model's answer to a chat user moves)."""
    was_training = model.training
    model.eval()
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    out: list = [None] * len(prompts)
    for rows in _by_length([len(p) for p in prompts], batch_size):
        with last_position_logits(model):
            new = generate(model, [prompts[i] for i in rows], max_new_tokens, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id)
        for i, ids in zip(rows, new):
            out[i] = ids + ([tok.end_of_turn_id] if len(ids) < max_new_tokens else [])
    model.train(was_training)
    return out


def chat_examples(model, tok, questions: list[str], max_new_tokens: int = 48) -> list[Example]:
    """The chat probe's items: each question in the chat template, then the model's own
    greedy answer (chat_answers) as the scored tokens."""
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    return [Example(p + a, len(p)) for p, a in zip(prompts, chat_answers(model, tok, questions, max_new_tokens))]


def chat_calibration_windows(model, tok, n_samples: int, seq_len: int, seed: int | None = None,
                             answer_tokens: int = 48) -> torch.Tensor:
    """--calib-source chat: NQ-open calibration questions (shuffled by the seed) with the
    model's own greedy answers, as whole chat-template conversations (system prompt, user
    turn, assistant turn), joined and cut into (n_samples, seq_len) windows. Answers are
    generated 16 questions at a time until the windows are full."""
    import random
    questions = [r["question"] for r in nq_open("calibration")]
    if seed is not None:
        random.Random(seed).shuffle(questions)
    conversations, n_tokens = [], 0
    for start in range(0, len(questions), 16):
        chunk = questions[start:start + 16]
        for q, answer in zip(chunk, chat_answers(model, tok, chunk, answer_tokens)):
            conversations.append(tok.encode_chat([{"role": "user", "content": q}]) + answer + tok.encode("\n"))
            n_tokens += len(conversations[-1])
        if n_tokens >= n_samples * seq_len:
            break
    return chat_windows(conversations, n_samples, seq_len)
