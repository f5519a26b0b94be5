"""The toy world: a tiny LLaMA that learns facts from scratch, then a new skill with LoRA.

Pre-trained knowledge = facts about entities ("e17 colour" -> "colour5"): 64 entities x 4
relations, each value drawn at random from 16, memorised by a tiny model (2 layers, width
64) trained from scratch in about ten seconds.

The new skill, learnt afterwards with LoRA, is answering through synonyms of the relations
("e17 hue" -> "colour5", likewise town/city, animal/pet, dish/food). The synonyms never
occur in pre-training or calibration. Like a word a real model has seen rarely, each one
starts half-understood: after pre-training its embedding is set to a mix of its relation's
embedding (weight `synonym_mix`) and noise, so the base model answers ~10% of synonym
questions and fine-tuning has something real to learn. The skill generalises: it is
trained on some entities and tested on others, and it needs the facts, so fine-tuning has
every reason to touch the weights that hold them.

Splits (all disjoint, fixed):
- calibration: the facts of entities 0-31 (they stand for the knowledge to preserve);
- retention: the facts of entities 32-63, never calibrated or trained on;
- skill: test = synonym questions about entities e % 4 == 3; validation (for choosing the
  learning rate) = entities e % 8 == 2; train = the rest.

Why the prompt puts the entity before the relation: the answer is then predicted at the
relation token, which only has to look one token back for the entity. With the relation
first ("colour of e17") a model this small sits on a plateau for hundreds of steps.

Everything is deterministic given the seed. The pre-trained model is cached
(cache_dir()/toy/) and reused, not retrained on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass

import torch

from model import ModelConfig, Transformer

N_ENTITIES = 64
RELATIONS = {"colour": 16, "city": 16, "pet": 16, "food": 16}  # relation -> number of values
SYNONYMS = {"hue": "colour", "town": "city", "animal": "pet", "dish": "food"}  # the new skill's words
TOY_VERSION = 2  # bump when the world or the pre-training recipe changes (invalidates the cache)


class ToyTokenizer:
    """Word-level tokenizer over the toy vocabulary (the same interface as Tokenizer)."""

    def __init__(self):
        words = ["<pad>", "<bos>", "<eos>"] + list(RELATIONS) + list(SYNONYMS)
        words += [f"e{i}" for i in range(N_ENTITIES)]
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
        """The toy 'chat template': <bos> question (the answer follows directly)."""
        (message,) = [m for m in messages if m["role"] == "user"]
        return [self.bos_id] + self.encode(message["content"])


# ----------------------------------------------------------------------------- the world
def world_facts(seed: int = 0) -> list[dict]:
    """Every (entity, relation) fact as {question, answer, entity, relation}."""
    rng = random.Random(seed)
    facts = []
    for e in range(N_ENTITIES):
        for rel, n_values in RELATIONS.items():
            facts.append({"question": f"e{e} {rel}", "answer": f"{rel}{rng.randrange(n_values)}",
                          "entity": e, "relation": rel})
    return facts


def calibration_facts(seed: int = 0) -> list[dict]:
    """Facts of the first half of the entities: the knowledge the calibration sees."""
    return [f for f in world_facts(seed) if f["entity"] < N_ENTITIES // 2]


def heldout_facts(seed: int = 0) -> list[dict]:
    """Facts of the second half: retention is measured here (never calibrated or trained on)."""
    return [f for f in world_facts(seed) if f["entity"] >= N_ENTITIES // 2]


def skill_split(entity: int) -> str:
    """Which split of the skill an entity's synonym questions belong to."""
    return "test" if entity % 4 == 3 else "val" if entity % 8 == 2 else "train"


def skill_task(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """The new skill: questions through a synonym of the relation, {question, answer}.

    Splits "train" (160 questions), "val" (32) and "test" (64), disjoint by entity; at most
    n rows (all when n is None).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown skill split {split!r} (train, val, test)")
    synonym_of = {rel: syn for syn, rel in SYNONYMS.items()}
    rows = [{"question": f"e{f['entity']} {synonym_of[f['relation']]}", "answer": f["answer"]}
            for f in world_facts(seed) if skill_split(f["entity"]) == split]
    return rows[:n]


# ----------------------------------------------------------------------------- pre-training
@dataclass
class ToyPretrainConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 384
    steps: int = 250            # full-batch steps: every fact in every step
    lr: float = 1e-2
    warmup: int = 30
    synonym_mix: float = 0.2    # a synonym's embedding = mix * its relation's + (1 - mix) * noise
    seed: int = 0


def toy_model_config(cfg: ToyPretrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                       vocab_size=vocab_size, hidden_dim=cfg.hidden_dim, rope_theta=10000.0,
                       max_seq_len=16, tie_embeddings=True)


def pretrain_toy(cfg: ToyPretrainConfig, log=print) -> Transformer:
    """Train a tiny LLaMA from scratch until it knows every fact (full batch), then give the
    synonyms their half-understood embeddings."""
    from loranull_mini.data import collate, encode_qa
    tok = ToyTokenizer()
    torch.manual_seed(cfg.seed)
    model = Transformer(toy_model_config(cfg, tok.n_vocab))
    batch = collate([encode_qa(tok, f["question"], f["answer"]) for f in world_facts(cfg.seed)], tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.steps):
        # linear warm-up, then linear decay to 10%
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * (1 - step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        _, loss = model(batch["idx"], batch["targets"], batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"toy pre-training step {step:5d}  loss {loss.item():.4f}")
    with torch.no_grad():
        E = model.tok_embeddings.weight                      # (V, D), tied with the output
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for synonym, rel in SYNONYMS.items():
            target = E[tok.vocab[rel]]
            noise = torch.randn(E.shape[1], generator=g) * target.norm() / E.shape[1] ** 0.5
            E[tok.vocab[synonym]] = cfg.synonym_mix * target + (1 - cfg.synonym_mix) * noise
    return model.eval()


def load_toy_model(cfg: ToyPretrainConfig | None = None, log=print) -> tuple[Transformer, ToyTokenizer]:
    """The pre-trained toy model, from the cache when it was trained before."""
    from loranull_mini.assets import cache_dir
    cfg = cfg or ToyPretrainConfig()
    world = {"vocab": ToyTokenizer().words, "relations": RELATIONS, "synonyms": SYNONYMS, "v": TOY_VERSION}
    key = hashlib.sha256(json.dumps({**asdict(cfg), **world}, sort_keys=True).encode()).hexdigest()[:12]
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
