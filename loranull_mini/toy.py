"""The toy world: a tiny LLaMA that knows facts, then learns a new skill with LoRA.

Pre-trained knowledge = facts about entities ("e17 colour" -> "colour5"): 64 entities x 4
relations, each value drawn at random from 16, memorised by a tiny model (2 layers, width
64). The model ships with the package (toy_model.safetensors, verified by its sha256), so
every machine starts from the same weights; `python -m loranull_mini.toy pretrain OUT`
trains one afresh (about ten seconds; bit-equal only on the same machine and threads).

The new skill, learnt with LoRA, is to answer through synonyms of the relations ("e17 hue"
-> "colour5", likewise town/city, animal/pet, dish/food). The synonyms never occur in
pre-training or calibration. Their embeddings are part of the world, set per seed by the
overlap knob: the direction a synonym gives the first layer's input is drawn from the
top, a random or the bottom eigenspace of that input's calibration covariance (16 of 64
dimensions), mixed with the projection of its relation's direction onto the same space
(so the base model half-understands it). "bottom" puts the new skill where the calibration
inputs are not, which suits LoRA-Null; "top" puts it where they are, which should defeat
it; "random" sits between. A study that shows only one of them shows a built-in answer.

A seed changes the world (which entities are calibrated on, which carry the skill's
train / validation / test questions, the synonyms' embeddings), the data order and the
adapter's initialisation. Splits, all disjoint by entity:
- calibration: the facts of 32 entities (they stand for the knowledge to preserve);
- retention: the facts of the other 32, never calibrated or trained on;
- skill: test = the synonym questions of 16 entities, validation of 8, training of 40.

Why the prompt puts the entity before the relation: the answer is then predicted at the
relation token, which only has to look one token back for the entity.
"""
from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model import ModelConfig, Transformer

N_ENTITIES = 64
RELATIONS = {"colour": 16, "city": 16, "pet": 16, "food": 16}  # relation -> number of values
SYNONYMS = {"hue": "colour", "town": "city", "animal": "pet", "dish": "food"}  # the new skill's words
OVERLAPS = ("top", "random", "bottom")
SPACE_DIM = 16        # dimensions of the eigenspace the synonyms' directions are drawn from
SYNONYM_MIX = 0.4     # weight of the relation's (projected) direction in a synonym's direction
MODEL_FILE = Path(__file__).with_name("toy_model.safetensors")
MODEL_SHA256 = "bbb6dec92294e9d6a05c79d9683b3d0d287c7295b2739a57b93afca79273a102"


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
def world_facts() -> list[dict]:
    """Every (entity, relation) fact as {question, answer, entity, relation}; the same in every world."""
    rng = random.Random(0)
    return [{"question": f"e{e} {rel}", "answer": f"{rel}{rng.randrange(n)}", "entity": e, "relation": rel}
            for e in range(N_ENTITIES) for rel, n in RELATIONS.items()]


def entity_roles(seed: int = 0) -> dict[int, tuple[str, str]]:
    """entity -> (fact role: calibration or retention, skill split: train, val or test), by seed.

    Half the entities of each skill split are calibrated on, half kept for retention."""
    order = list(range(N_ENTITIES))
    random.Random(seed).shuffle(order)
    skill = ["test"] * 16 + ["val"] * 8 + ["train"] * 40
    return {e: ("calibration" if i % 2 == 0 else "retention", skill[i]) for i, e in enumerate(order)}


def calibration_facts(seed: int = 0) -> list[dict]:
    """The facts the calibration sees (they stand for the knowledge to preserve)."""
    roles = entity_roles(seed)
    return [f for f in world_facts() if roles[f["entity"]][0] == "calibration"]


def heldout_facts(seed: int = 0) -> list[dict]:
    """Retention is measured here: never calibrated or trained on."""
    roles = entity_roles(seed)
    return [f for f in world_facts() if roles[f["entity"]][0] == "retention"]


def skill_task(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """The new skill: questions through a synonym of the relation, {question, answer}.

    Splits "train" (160 questions), "val" (32) and "test" (64), disjoint by entity; at most
    n rows (all when n is None).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown skill split {split!r} (train, val, test)")
    synonym_of = {rel: syn for syn, rel in SYNONYMS.items()}
    roles = entity_roles(seed)
    rows = [{"question": f"e{f['entity']} {synonym_of[f['relation']]}", "answer": f["answer"]}
            for f in world_facts() if roles[f["entity"]][1] == split]
    return rows[:n]


# ----------------------------------------------------------------------------- the model
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
    seed: int = 0


def toy_model_config(cfg: ToyPretrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                       vocab_size=vocab_size, hidden_dim=cfg.hidden_dim, rope_theta=10000.0,
                       max_seq_len=16, tie_embeddings=True)


def pretrain_toy(cfg: ToyPretrainConfig = ToyPretrainConfig(), log=print) -> Transformer:
    """Train a tiny LLaMA from scratch until it knows every fact (full batch, AdamW)."""
    from loranull_mini.data import collate, encode_qa
    tok = ToyTokenizer()
    torch.manual_seed(cfg.seed)
    model = Transformer(toy_model_config(cfg, tok.n_vocab))
    batch = collate([encode_qa(tok, f["question"], f["answer"]) for f in world_facts()], tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * (1 - step / cfg.steps))  # warm-up, decay
        for g in opt.param_groups:
            g["lr"] = lr
        _, loss = model(batch["idx"], batch["targets"], batch["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"toy pre-training step {step:5d}  loss {loss.item():.4f}")
    return model.eval()


def load_pretrained(path: Path | None = None, sha256: str | None = MODEL_SHA256) -> Transformer:
    """The pre-trained toy model from its file (default MODEL_FILE), verified (sha256, tensor
    names, shapes, finite)."""
    from safetensors.torch import load_file
    tok = ToyTokenizer()
    path = MODEL_FILE if path is None else path
    if not Path(path).is_file():
        raise FileNotFoundError(f"toy model file not found: {path}")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{path}: sha256 {digest[:16]}... is not the toy model's {sha256[:16]}...: the file is "
                         f"damaged or another one; restore the shipped file with `git checkout -- "
                         f"loranull_mini/toy_model.safetensors`")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    model = Transformer(toy_model_config(ToyPretrainConfig(), tok.n_vocab))
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "output.weight"}
    found = {k: v.shape for k, v in state.items()}
    if found != expected or not all(torch.isfinite(v).all() for v in state.values()):
        raise ValueError(f"{path}: the tensors are not those of the toy model (names, shapes or values)")
    model.load_state_dict({**state, "output.weight": state["tok_embeddings.weight"]})
    return model.eval()


def load_toy_model(seed: int = 0, overlap: str = "random", log=print) -> tuple[Transformer, ToyTokenizer]:
    """The toy model of world `seed`: the shipped pre-trained weights, then the synonyms'
    embeddings set by the overlap knob (see set_synonyms)."""
    model, tok = load_pretrained(), ToyTokenizer()
    set_synonyms(model, tok, seed, overlap)
    return model, tok


@torch.no_grad()
def input_covariance(model: Transformer, tok: ToyTokenizer, facts: list[dict]) -> torch.Tensor:
    """The covariance (float64) of the first layer's attention input over the facts' tokens."""
    from loranull_mini.data import collate, encode_qa
    import nullspace
    batch = collate([encode_qa(tok, f["question"], f["answer"]) for f in facts], tok.pad_id)
    return nullspace.collect_covariances(model, [(batch["idx"], batch["pad_mask"])], ("q",))["layers.0.attention.wq"]


def eigenspace(C: torch.Tensor, overlap: str, seed: int, k: int = SPACE_DIM) -> torch.Tensor:
    """(n, k) orthonormal basis: C's eigenvectors of the k largest ("top"), k smallest
    ("bottom") or k random ("random", drawn by seed) eigenvalues."""
    if overlap not in OVERLAPS:
        raise ValueError(f"unknown overlap {overlap!r}; choose from {OVERLAPS}")
    Q = torch.linalg.eigh(C)[1]                                               # ascending eigenvalues
    n = Q.shape[1]
    index = {"bottom": list(range(k)), "top": list(range(n - k, n)),
             "random": sorted(random.Random(10_000 + seed).sample(range(n), k))}[overlap]
    return Q[:, index]


@torch.no_grad()
def set_synonyms(model: Transformer, tok: ToyTokenizer, seed: int, overlap: str):
    """Give every synonym an embedding whose first-layer attention input points into the
    chosen eigenspace S of that input's calibration covariance:
        d = normalise(mix * P_S(relation's input direction) + (1 - mix) * u),  u random unit in S
    and the embedding e with attention_norm(e) along d: e = d / g (g the norm's weight),
    scaled to the relations' embedding norm (RMSNorm ignores the scale)."""
    S = eigenspace(input_covariance(model, tok, calibration_facts(seed)), overlap, seed)   # (n, k)
    E, g = model.tok_embeddings.weight, model.layers[0].attention_norm.weight.double()
    generator = torch.Generator().manual_seed(20_000 + seed)
    norm = torch.stack([E[tok.vocab[rel]].norm() for rel in RELATIONS]).mean()
    for synonym, rel in SYNONYMS.items():
        relation_direction = E[tok.vocab[rel]].double() * g                   # attention_norm(e) up to scale
        projected = S @ (S.T @ relation_direction)
        u = S @ torch.randn(S.shape[1], generator=generator, dtype=torch.float64)
        d = SYNONYM_MIX * projected / projected.norm() + (1 - SYNONYM_MIX) * u / u.norm()
        e = d / g
        E[tok.vocab[synonym]] = (e * norm / e.norm()).to(E.dtype)


def save_pretrained(model: Transformer, path: Path) -> str:
    """Write the model (tied output left out) and return the file's sha256."""
    from safetensors.torch import save_file
    from loranull_mini.files import atomic_write
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "pretrain":
        sys.exit("usage: python -m loranull_mini.toy pretrain OUT.safetensors")
    print(f"sha256 {save_pretrained(pretrain_toy(), Path(sys.argv[2]))}")
