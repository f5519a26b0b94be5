"""The toy world: a tiny LLaMA that learns facts from scratch, then a new skill with LoRA.

Pre-trained knowledge = facts about entities ("what is the colour of e17 ?" -> "colour5"),
memorised by a tiny model trained from scratch in seconds. The new skill, learnt afterwards
with LoRA, is reversing a list of three entities ("reverse e3 e9 e1" -> "e1 e9 e3"): it
reads the same entity tokens, so fine-tuning can overwrite what the model knew about them.

Facts of the first half of the entities are the calibration text (they stand for the
knowledge to preserve); retention is measured on the facts of the other half, which the
calibration never saw. Everything is deterministic given the seed. The pre-trained model is
cached (cache_dir()/toy/) and reused, not retrained on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass

import torch

from model import ModelConfig, Transformer

N_ENTITIES = 128
RELATIONS = {"colour": 16, "city": 16, "pet": 16, "food": 16}  # relation -> number of values
REVERSE_LEN = 3
TOY_VERSION = 1  # bump when the world or the pre-training recipe changes (invalidates the cache)


class ToyTokenizer:
    """Word-level tokenizer over the toy vocabulary (the same interface as Tokenizer)."""

    def __init__(self):
        words = ["<pad>", "<bos>", "<eos>", "Q:", "A:", "what", "is", "the", "of", "?", "reverse"]
        words += list(RELATIONS) + [f"e{i}" for i in range(N_ENTITIES)]
        words += [f"{rel}{v}" for rel, n in RELATIONS.items() for v in range(n)]
        self.vocab = {w: i for i, w in enumerate(words)}
        self.words = words
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.end_of_turn_id = self.eos_id
        self.stop_ids = {self.eos_id}
        self.n_vocab = len(words)

    def encode(self, text: str, **_) -> list[int]:
        try:
            return [self.vocab[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the toy vocabulary") from None

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if i >= 3)

    def encode_chat(self, messages, add_generation_prompt=True) -> list[int]:
        """The toy 'chat template': <bos> Q: question A:"""
        (message,) = [m for m in messages if m["role"] == "user"]
        return [self.bos_id] + self.encode(f"Q: {message['content']} A:")


# ----------------------------------------------------------------------------- the world
def world_facts(seed: int = 0) -> list[dict]:
    """Every (entity, relation) fact as {question, answer, entity}."""
    rng = random.Random(seed)
    facts = []
    for e in range(N_ENTITIES):
        for rel, n_values in RELATIONS.items():
            facts.append({"question": f"what is the {rel} of e{e} ?", "answer": f"{rel}{rng.randrange(n_values)}",
                          "entity": e})
    return facts


def calibration_facts(seed: int = 0) -> list[dict]:
    """Facts of the first half of the entities: the knowledge the calibration sees."""
    return [f for f in world_facts(seed) if f["entity"] < N_ENTITIES // 2]


def heldout_facts(seed: int = 0) -> list[dict]:
    """Facts of the second half: retention is measured here (never calibrated or trained on)."""
    return [f for f in world_facts(seed) if f["entity"] >= N_ENTITIES // 2]


def reverse_task(split: str, n: int, seed: int = 0) -> list[dict]:
    """The new skill: reverse three entity names. Train and test lists never overlap."""
    rng = random.Random(1000 + seed + (0 if split == "train" else 1))
    rows = []
    while len(rows) < n:
        items = rng.sample(range(N_ENTITIES), REVERSE_LEN)
        # a fixed parity rule keeps train and test disjoint: sum of ids even -> train
        if (sum(items) % 2 == 0) != (split == "train"):
            continue
        rows.append({"question": "reverse " + " ".join(f"e{i}" for i in items),
                     "answer": " ".join(f"e{i}" for i in reversed(items))})
    return rows


# ----------------------------------------------------------------------------- pre-training
@dataclass
class ToyPretrainConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 384
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def toy_model_config(cfg: ToyPretrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                       vocab_size=vocab_size, hidden_dim=cfg.hidden_dim, rope_theta=10000.0,
                       max_seq_len=32, tie_embeddings=True)


def pretrain_toy(cfg: ToyPretrainConfig, log=print) -> Transformer:
    """Train a tiny LLaMA from scratch until it knows every fact of the world."""
    from loranull_mini.data import batch_order, collate, encode_qa
    tok = ToyTokenizer()
    torch.manual_seed(cfg.seed)
    model = Transformer(toy_model_config(cfg, tok.n_vocab))
    examples = [encode_qa(tok, f["question"], f["answer"]) for f in world_facts(cfg.seed)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = collate([examples[i] for i in batch_order(len(examples), cfg.batch_size, step, cfg.seed)],
                        tok.pad_id)
        _, loss = model(batch["idx"], batch["targets"], batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"toy pre-training step {step:5d}  loss {loss.item():.4f}")
    return model.eval()


def load_toy_model(cfg: ToyPretrainConfig | None = None, log=print) -> tuple[Transformer, ToyTokenizer]:
    """The pre-trained toy model, from the cache when it was trained before."""
    from loranull_mini.assets import cache_dir
    cfg = cfg or ToyPretrainConfig()
    key = hashlib.sha256(json.dumps({**asdict(cfg), "v": TOY_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "toy" / f"toy-{key}.pt"
    tok = ToyTokenizer()
    if path.is_file():
        model = Transformer(toy_model_config(cfg, tok.n_vocab))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), tok
    log(f"pre-training the toy model (cached afterwards in {path})")
    model = pretrain_toy(cfg, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, tok
