"""Hand a training run's result to other tools: a PEFT adapter, a merged HF checkpoint, a GGUF.

    python -m loranull_mini.export RUN_DIR --to peft|hf|gguf [--out DIR] [--force]

RUN_DIR is what train.py wrote (RUN_DIR/adapter holds adapter.safetensors and
adapter_config.json); an adapter directory itself is accepted too. The base model is the
one the run trained on, read from the adapter's "train_config": the toy model for
preset "toy", else train_config.model, else the default SmolLM2-135M-Instruct GGUF;
--model PATH overrides it. The adapter only loads onto the exact weights it was trained on
(load_adapter checks a fingerprint).

--to peft   adapter_model.safetensors + adapter_config.json: a Hugging Face PEFT LoRA
            adapter for transformers' LlamaForCausalLM, on the ORIGINAL base weights (for a
            PiSSA / LoRA-Null / ... init it is the plain delta of rank 2r, see adapter_io).
            PEFT needs the base in HF layout: with --with-base it is written to DIR/base
            (config.json, model.safetensors, tokenizer files). SmolLM2's base is the Q4_1 GGUF
            dequantised to float32, not the Hub's SmolLM2 weights, so use DIR/base:
                base = LlamaForCausalLM.from_pretrained(DIR + "/base")
                model = PeftModel.from_pretrained(base, DIR)
--to hf     config.json + model.safetensors of a LlamaForCausalLM with the adapter merged
            (float32), generation_config.json, and tokenizer.json + tokenizer_config.json
            (byte-level BPE, special tokens, chat template) when the base has a tokenizer:
                LlamaForCausalLM.from_pretrained(DIR); AutoTokenizer.from_pretrained(DIR)
            loranull_mini.checkpoint.load_model(DIR) reads it back too.
--to gguf   model-f16.gguf: the merged model for llama.cpp, matrices float16 and norms
            float32, with the base's vocabulary (copied from the base GGUF, or built from
            its tokenizer) and chat template.

The toy model's word-level vocabulary is not byte-level BPE: its exports carry no tokenizer
(a note says so); its ids are loranull_mini.toy.ToyTokenizer's.

Each export directory also gets a README.md saying what it holds and how to load it.
Errors are one line, "error: ...", with exit status 1 (as train.py and eval.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see train.py)
import torch  # noqa: E402

import lora  # noqa: E402
from loranull_mini import adapter_io, checkpoint  # noqa: E402
from loranull_mini.files import atomic_directory, write_json, write_text  # noqa: E402
from loranull_mini.tokenizer import (GPT2_PATTERN, LLAMA3_PATTERN, SMOLLM_PATTERN, Tokenizer,  # noqa: E402
                                     bytes_to_unicode)

KINDS = ("peft", "hf", "gguf")
GGUF_FILE = "model-f16.gguf"
BASE_DIR = "base"
MARKER = ".loranull-export.json"  # {kind, files}: what an export wrote; --force replaces only such a directory
# Every file name an export writes.
EXPORT_FILES = (adapter_io.PEFT_WEIGHTS, adapter_io.PEFT_CONFIG, "config.json", "model.safetensors",
                "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", GGUF_FILE, "README.md")
# llama.cpp's name (tokenizer.ggml.pre) for each split pattern our tokenizers use.
LLAMA_CPP_PRE = {SMOLLM_PATTERN: "smollm", LLAMA3_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}


class ExportError(ValueError):
    """A run directory, base model or output directory the export cannot use."""


@dataclasses.dataclass
class Base:
    """The base model a run trained on, as loaded for exporting."""
    model: torch.nn.Module
    tokenizer: object          # Tokenizer, ToyTokenizer or None
    source: str                # "toy" (toy:SEED:OVERLAP), or the checkpoint's path
    label: str                 # a name for general.name and messages
    gguf_reader: object = None  # the base GGUF, when it came from one

    @property
    def bpe(self) -> Tokenizer | None:
        """The byte-level BPE tokenizer, when the base has one (not the toy's word list)."""
        return self.tokenizer if isinstance(self.tokenizer, Tokenizer) else None


# ----------------------------------------------------------------------------- the run
def find_adapter(run_dir) -> Path:
    """RUN_DIR/adapter (train.py's layout), or RUN_DIR itself when it is an adapter directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    for candidate in (run_dir / "adapter", run_dir):
        if (candidate / adapter_io.ADAPTER_CONFIG).is_file() and (candidate / adapter_io.ADAPTER_WEIGHTS).is_file():
            return candidate
    raise ExportError(f"{run_dir} holds no adapter: expected {run_dir / 'adapter'}/{adapter_io.ADAPTER_CONFIG} "
                      f"and {adapter_io.ADAPTER_WEIGHTS}, as train.py writes them")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / adapter_io.ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path} is not an adapter config (not a JSON object)")
    return cfg


def base_source(cfg: dict, config_path: Path, override: str | None = None) -> str | None:
    """"toy:SEED:OVERLAP", a checkpoint path, or None for the default SmolLM2 GGUF."""
    if override:
        return override
    train = cfg.get("train_config")
    if isinstance(train, dict):  # a toy run's world depends on its seed and overlap setting
        if train.get("preset") == "toy":
            return f"toy:{train.get('seed', 0)}:{train.get('toy_overlap', 'random')}"
        return train.get("model") or None
    if cfg.get("base_model") == "toy":
        return "toy"
    if cfg.get("base_model") and Path(cfg["base_model"]).exists():
        return cfg["base_model"]
    raise ExportError(f"{config_path} does not say which base model the adapter was trained on "
                      "(no train_config): pass --model PATH")


def load_base(source: str | None, config_path: Path, log=print) -> Base:
    """The plain base model (float32, CPU) and its tokenizer."""
    if source is not None and (source == "toy" or source.startswith("toy:")):  # toy:SEED:OVERLAP
        from loranull_mini import toy
        _, seed, overlap = (source + ":0:random").split(":")[:3]
        model, tok = toy.load_toy_model(int(seed), overlap, log=log)
        return Base(model, tok, "toy", "toy")
    if source is None:
        from loranull_mini import assets
        path = assets.fetch("smollm2-135m-instruct")
    else:
        path = Path(source)
        if not path.exists():
            raise ExportError(f"base model not found: {path} (named by {config_path}); pass --model PATH")
    model, tok = checkpoint.load_model(path)
    reader = checkpoint.open_gguf(path) if checkpoint.checkpoint_format(path) == "gguf" else None
    label = path.name
    if reader is not None and "general.name" in reader.fields:
        label = reader.fields["general.name"].contents()
    return Base(model, tok, str(path), label, reader)


# ----------------------------------------------------------------------------- tokenizer files
def _bpe_vocabulary(tok: Tokenizer) -> tuple[str, dict[bytes, int]]:
    """(split pattern, {token bytes: id}) of a byte-level BPE Tokenizer."""
    return tok._split.pattern, tok._ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """A merge list that reproduces tiktoken's rank-ordered BPE: for every multi-byte token,
    in id order, each of its splits into two tokens (ordered by the parts' ids). BPE that
    applies the earliest applicable merge then always makes the lowest-id token, as tiktoken
    does (transformers converts tiktoken vocabularies, LLaMA-3's, the same way)."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def tokenizer_merges(base: Base) -> list[tuple[str, str]]:
    """The merges as pairs of byte-level token spellings ("Ġ", "t"): the base GGUF's own list,
    else derived from the vocabulary (bpe_merges)."""
    reader = base.gguf_reader
    if reader is not None and "tokenizer.ggml.merges" in reader.fields:
        return [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    spell = bytes_to_unicode()
    return [("".join(map(spell.__getitem__, a)), "".join(map(spell.__getitem__, b)))
            for a, b in bpe_merges(_bpe_vocabulary(base.bpe)[1])]


def tokenizer_json(tok: Tokenizer, merges: list[tuple[str, str]]) -> dict:
    """tokenizer.json (HF `tokenizers`) for a byte-level BPE Tokenizer.

    The split pattern is a Split(Isolated) pre-tokenizer followed by ByteLevel without its
    own regex; special tokens are added tokens matched before splitting; ignore_merges
    takes a piece that is a whole token as that token, as tiktoken does.
    """
    pattern, ranks = _bpe_vocabulary(tok)
    spell = bytes_to_unicode()
    vocab = {"".join(spell[b] for b in token): i for token, i in ranks.items()}
    vocab.update(tok.special_tokens)
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for text, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])]
    post_processor = None
    if tok.add_bos and tok.bos_id is not None:
        bos = next(text for text, i in tok.special_tokens.items() if i == tok.bos_id)
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def _token_text(tok: Tokenizer, i: int | None) -> str | None:
    if i is None:
        return None
    return next((text for text, j in tok.special_tokens.items() if j == i), None) or tok.decode([i])


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    """tokenizer_config.json: the tokenizer class transformers should use, bos/eos/pad, the
    chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = _token_text(tok, i)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    return config


def special_ids(tok) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json; eos lists every id at
    which generation stops (the end-of-turn token of a chat model too), eos first."""
    ids = {}
    if tok.bos_id is not None:
        ids["bos_token_id"] = tok.bos_id
    stops = ([tok.eos_id] if tok.eos_id is not None else []) + sorted(tok.stop_ids - {tok.eos_id})
    if stops:
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if tok.pad_id is not None:
        ids["pad_token_id"] = tok.pad_id
    return ids


def write_tokenizer_files(base: Base, directory: Path) -> list[str]:
    """Next to a saved HF model: tokenizer.json and tokenizer_config.json (a byte-level BPE
    base), generation_config.json and the special ids in config.json (any tokenizer: the
    toy's too); the names written."""
    written = []
    if base.bpe is not None:
        write_json(directory / "tokenizer.json", tokenizer_json(base.bpe, tokenizer_merges(base)))
        write_json(directory / "tokenizer_config.json", tokenizer_config(base.bpe, base.model.config.max_seq_len))
        written += ["tokenizer.json", "tokenizer_config.json"]
    if base.tokenizer is not None:
        ids = special_ids(base.tokenizer)
        write_json(directory / "generation_config.json", ids)
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        write_text(directory / "config.json", json.dumps({**config, **ids}, indent=2) + "\n")
        written += ["generation_config.json"]
    return written


# ----------------------------------------------------------------------------- GGUF tokenizer
def gguf_fields_from_reader(reader) -> dict:
    """Every tokenizer.* key of a GGUF file with its value type, for save_gguf."""
    import gguf

    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            is_array = field.types[0] == gguf.GGUFValueType.ARRAY
            fields[key] = (field.contents(), field.types[-1] if is_array else field.types[0])
    return fields


def gguf_fields_from_tokenizer(tok: Tokenizer, vocab_size: int) -> dict:
    """llama.cpp's tokenizer keys for a byte-level BPE Tokenizer ("gpt2" model). Ids the
    tokenizer does not use (an embedding padded past the vocabulary) become UNUSED
    "[PADi]" tokens, as llama.cpp's converter writes them."""
    import gguf

    T = gguf.GGUFValueType
    pattern, ranks = _bpe_vocabulary(tok)
    if pattern not in LLAMA_CPP_PRE:
        raise ExportError(f"the tokenizer's split pattern {pattern[:60]!r}... has no llama.cpp pre-tokenizer "
                          f"name (known: {', '.join(LLAMA_CPP_PRE.values())}); export --to hf instead")
    if tok.n_vocab > vocab_size:
        raise ExportError(f"the tokenizer has {tok.n_vocab} ids but the embedding only {vocab_size} rows")
    spell = bytes_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    kinds = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ranks.items():
        tokens[i], kinds[i] = "".join(spell[b] for b in token), gguf.TokenType.NORMAL
    for text, i in tok.special_tokens.items():
        tokens[i], kinds[i] = text, gguf.TokenType.CONTROL
    merges = [" ".join("".join(spell[b] for b in part) for part in pair) for pair in bpe_merges(ranks)]
    fields = {
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": (LLAMA_CPP_PRE[pattern], T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.STRING),
        "tokenizer.ggml.token_type": ([int(k) for k in kinds], T.INT32),
        "tokenizer.ggml.merges": (merges, T.STRING),
        "tokenizer.ggml.add_bos_token": (tok.add_bos, T.BOOL),
    }
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id),
                   ("eot", tok.end_of_turn_id if tok.end_of_turn_id != tok.eos_id else None)):
        if i is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (i, T.UINT32)
    if tok.chat_template is not None:
        fields["tokenizer.chat_template"] = (tok.chat_template, T.STRING)
    return fields


def gguf_tokenizer_fields(base: Base) -> dict | None:
    """The base GGUF's own tokenizer keys, else ones built from its tokenizer, else None."""
    reader = base.gguf_reader
    if reader is not None and "tokenizer.ggml.tokens" in reader.fields:
        return gguf_fields_from_reader(reader)
    if base.bpe is not None:
        return gguf_fields_from_tokenizer(base.bpe, base.model.config.vocab_size)
    return None


# ----------------------------------------------------------------------------- the exports
def _tokenizer_note(base: Base, log) -> None:
    if base.tokenizer is None:
        log(f"note       the base model {base.source} has no tokenizer: none is exported")
    elif base.bpe is None:
        log("note       the toy model's word-level vocabulary is not byte-level BPE: no tokenizer is "
            "exported (its ids are loranull_mini.toy.ToyTokenizer's)")


def _save_hf_with_tokenizer(base: Base, directory: Path, log) -> list[str]:
    checkpoint.save_hf(base.model, directory)
    if base.bpe is None:
        _tokenizer_note(base, log)
    return ["config.json", "model.safetensors"] + write_tokenizer_files(base, directory)


def _readme(kind: str, base: Base, run_dir: Path, adapter_dir: Path, adapter_cfg: dict, out: Path,
            written_to: Path | None = None) -> str:
    """README.md of an export: what the directory holds and how to load it."""
    method = adapter_cfg.get("method", adapter_cfg.get("init", "?"))
    lines = [f"# {method} LoRA on {base.label}: {kind} export", "",
             f"Written by `python -m loranull_mini.export {run_dir} --to {kind}` from the adapter in "
             f"`{adapter_dir}` (r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('alpha')}) on the base model "
             f"`{base.source}`.", ""]
    tokenizer = ("- tokenizer.json, tokenizer_config.json: the base model's byte-level BPE tokenizer, special "
                 "tokens and chat template" if base.bpe is not None else
                 "- no tokenizer files: the base model has no byte-level BPE tokenizer")
    if kind == "peft":
        has_base = ((written_to or out) / BASE_DIR / "config.json").is_file()
        lines += ["- adapter_model.safetensors, adapter_config.json: a Hugging Face PEFT LoRA adapter for "
                  "transformers' LlamaForCausalLM, on the ORIGINAL base weights (for an init that moves weight "
                  "out of the base, such as PiSSA or LoRA-Null, it is the plain delta, rank 2r)",
                  f"- {BASE_DIR}/: those base weights in HF layout" if has_base else
                  "- the base weights are not included (`--with-base` writes them in HF layout)"]
        if base.gguf_reader is not None:
            lines += ["", "The base came from a GGUF file: the adapter belongs to its weights as dequantised to "
                      "float32, not to the unquantised original's (for the default base, SmolLM2-135M-Instruct "
                      "on the Hub)."]
        where = str(out / BASE_DIR) if has_base else "<the original base weights in HF layout>"
        lines += ["", "```python", "from peft import PeftModel", "from transformers import LlamaForCausalLM",
                  f'base = LlamaForCausalLM.from_pretrained("{where}")',
                  f'model = PeftModel.from_pretrained(base, "{out}")', "```"]
    elif kind == "hf":
        generation = ", generation_config.json" if base.tokenizer is not None else ""
        lines += [f"- config.json, model.safetensors{generation}: the fine-tuned model, adapter merged, float32",
                  tokenizer, "", "```python",
                  "from transformers import AutoTokenizer, LlamaForCausalLM",
                  f'model = LlamaForCausalLM.from_pretrained("{out}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{out}")'] if base.bpe is not None else []
        lines += ["```"]
    else:
        lines += [f"- {GGUF_FILE}: the fine-tuned model, adapter merged, for llama.cpp (matrices float16, norms "
                  "float32), " + ("with the base model's vocabulary and chat template" if base.bpe is not None
                                  else 'without a vocabulary (tokenizer.ggml.model "none")'),
                  "", "```", f"llama-cli -m {out / GGUF_FILE}", "```"]
    return "\n".join(lines) + "\n"


def check_out(out: Path, force: bool, kind: str) -> None:
    """Refuse an --out that is a file, or a non-empty directory unless force; with force, only
    an earlier export of the same kind (its marker file lists every file in it) is replaced."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"{out} exists and is not empty: pass --force to replace an earlier export there, "
                          f"or choose another --out")
    marker = out / MARKER
    try:
        earlier = json.loads(marker.read_text(encoding="utf-8"))
        earlier_kind, listed = earlier["kind"], set(earlier["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"--force replaces only an earlier export, and {out} is not one (no readable {MARKER}): "
                          f"choose another --out") from None
    if earlier_kind != kind:
        raise ExportError(f"{out} holds a --to {earlier_kind} export, not --to {kind}: --force replaces only an "
                          f"export of the same kind; choose another --out")
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {MARKER}
    if present - listed:
        extra = sorted(present - listed)
        raise ExportError(f"{out} holds files the earlier export did not write ({', '.join(extra[:3])}"
                          f"{' ...' if len(extra) > 3 else ''}): move them away, or choose another --out")


def export(run_dir, kind: str, out=None, *, model: str | None = None, force: bool = False,
           with_base: bool = False, log=print) -> Path:
    """Export the run in run_dir as `kind` (peft, hf, gguf) into `out`; returns out.

    Everything is written into a temporary sibling directory, which takes the place of out
    only once it is complete: a failing export leaves an earlier one as it was."""
    if kind not in KINDS:
        raise ExportError(f"unknown export kind {kind!r}: choose from {', '.join(KINDS)}")
    if with_base and kind != "peft":
        raise ExportError("--with-base is for --to peft (the hf and gguf exports are whole models)")
    run_dir = Path(run_dir)
    adapter_dir = find_adapter(run_dir)
    config_path = adapter_dir / adapter_io.ADAPTER_CONFIG
    adapter_cfg = read_adapter_config(adapter_dir)
    out = Path(out) if out else run_dir / f"export-{kind}"
    check_out(out, force, kind)                       # before the time spent loading
    base = load_base(base_source(adapter_cfg, config_path, model), config_path, log)
    adapter_io.read_adapter(adapter_dir)              # verified before anything is written
    log(f"base       {base.label} ({base.source})")
    written = []

    def write(tmp: Path):
        nonlocal written
        if kind == "peft":
            if with_base:
                written = [f"{BASE_DIR}/{name}" for name in _save_hf_with_tokenizer(base, tmp / BASE_DIR, log)]
            adapter_io.load_adapter(base.model, adapter_dir)
            adapter_io.export_peft(base.model, tmp, str((out / BASE_DIR).resolve()) if with_base else None)
            written = [adapter_io.PEFT_WEIGHTS, adapter_io.PEFT_CONFIG] + written
        else:
            adapter_io.load_adapter(base.model, adapter_dir)
            lora.unload_lora(base.model)              # W_res + s * B @ A, plain nn.Linear again
            if kind == "hf":
                written = _save_hf_with_tokenizer(base, tmp, log)
            else:
                fields = gguf_tokenizer_fields(base)
                if fields is None:
                    _tokenizer_note(base, log)
                name = f"{base.label} + {adapter_cfg.get('method', 'LoRA')} LoRA (merged)"
                checkpoint.save_gguf(base.model, tmp / GGUF_FILE, name=name, tokenizer_fields=fields)
                written = [GGUF_FILE]
        write_text(tmp / "README.md", _readme(kind, base, run_dir, adapter_dir, adapter_cfg, out, tmp))
        write_json(tmp / MARKER, {"kind": kind, "files": written + ["README.md"]})

    check_out(out, force, kind)                       # again: nothing appeared meanwhile
    atomic_directory(out, write)
    log(f"wrote      {out}: {', '.join(written + ['README.md'])}")
    return out


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, "error: ...", exit status 2."""

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m loranull_mini.export",
                     description="Export a training run (its LoRA adapter on its base model) as a PEFT adapter, "
                                 "a merged Hugging Face checkpoint or a merged GGUF.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a train.py output directory (with adapter/), or an adapter directory")
    parser.add_argument("--to", required=True, choices=KINDS,
                        help="peft: PEFT LoRA adapter for the original HF weights; hf: merged LlamaForCausalLM "
                             "with tokenizer files; gguf: merged float16 GGUF for llama.cpp")
    parser.add_argument("--out", default="", metavar="DIR", help="output directory (default: RUN_DIR/export-<kind>)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out (files of an earlier export there are replaced)")
    parser.add_argument("--model", default="", metavar="PATH",
                        help="base checkpoint (.gguf file, HF or Meta directory) instead of the one the run "
                             "recorded; it must hold the weights the adapter was trained on")
    parser.add_argument("--with-base", action="store_true",
                        help="--to peft: also write the original base weights in HF layout to OUT/base")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from loranull_mini.assets import AssetError
    try:
        export(args.run_dir, args.to, args.out or None, model=args.model or None, force=args.force,
               with_base=args.with_base)
    except (ValueError, OSError, AssetError) as e:   # CheckpointError and ExportError are ValueErrors
        message = " ".join(str(e).split())           # one line, also for messages listing files
        sys.stderr.write(f"error: {message}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
