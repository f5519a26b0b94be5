"""Read and write LLaMA checkpoints: GGUF (llama.cpp), HF safetensors, Meta consolidated.pth.

Every reader returns `(ModelConfig, state_dict)` with *our* tensor names (model.py) and q/k
rows in our rotary layout, so `Transformer(config).load_state_dict(state_dict)` just works.
Each format is one `{their_name: our_name}` table ("{}" stands for the layer number); one
loop, `convert`, renames the tensors and asserts that every tensor is used, none is missing
and every shape matches the config (the style of gpt-fast's convert_hf_checkpoint.py).

Rotary layouts. Rotary embeddings rotate the numbers of a q/k head in pairs.
- Meta and GGUF files pair neighbours: (x0, x1), (x2, x3), ...           "interleaved"
- HF files and model.py pair the two halves: (x0, x_{hd/2}), (x1, x_{hd/2+1}), ...
                                                                          "rotate-half"
The two are the same model up to a fixed permutation of the q and k output rows of every
head (scores q.k are unchanged when q and k are permuted alike), so Meta/GGUF q/k rows are
permuted once at load time by `permute_interleaved_to_half` and back when writing Meta.

`load_model` also returns the tokenizer stored with the weights: a GGUF's vocabulary, or
in a directory tokenizer.json (byte-level BPE) or LLaMA-3's tiktoken tokenizer.model.

Errors are `CheckpointError`s (a ValueError) that name the file and the problem. Every
value a reader takes from a config is type-checked first, weights must be floating point,
.pth files are unpickled with weights_only (tensors only, never code), and a safetensors
index may only name files inside its directory. The writers go through files.atomic_write:
a failed write is an OSError naming the file, and the files already there stay as they were.
"""
from __future__ import annotations

import base64
import contextlib
import math
import numbers
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loranull_mini import assets
from loranull_mini.files import atomic_write, read_json, write_json
from loranull_mini.tokenizer import Tokenizer
from model import ModelConfig, Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: unknown format, damaged file, wrong tensors."""


@contextlib.contextmanager
def config_errors(path):
    """Turn a missing key or an inconsistent config into a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks the key {e}") from None
    except (ValueError, TypeError) as e:  # e.g. ModelConfig: dim not divisible by n_heads
        raise CheckpointError(f"{path}: invalid config: {e}") from None


REQUIRED = object()  # setting()'s default for a key the file must have

# kind -> (test, what a value of that kind is)
KINDS = {
    "size": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0,
             "a positive integer"),
    "number": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
               and math.isfinite(v) and v > 0, "a positive number"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
}


def checked(value, kind: str, key: str, path):
    """value if it is of `kind` (KINDS), else a CheckpointError naming the file, the key and the value."""
    test, what = KINDS[kind]
    if not test(value):
        raise CheckpointError(f"{path}: {key} must be {what}, got {value!r}")
    return value


def setting(raw: dict, key: str, kind: str, path, default=REQUIRED):
    """raw[key] checked to be of `kind`. An absent or null key gives `default`; without one,
    absent is a KeyError (config_errors: "lacks the key") and null a CheckpointError."""
    if default is not REQUIRED and raw.get(key) is None:
        return default
    return checked(raw[key], kind, key, path)


# ----------------------------------------------------------------------------- rotary layout
def permute_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q or k rows from the interleaved-pair rotary layout to rotate-half.

    w: (n_heads * hd, in), the q (n_heads) or k (n_kv_heads) projection. Within a head,
    interleaved rows are [a0, b0, a1, b1, ...] (pair i = rows 2i, 2i+1); rotate-half rows
    are [a0, a1, ..., b0, b1, ...] (pair i = rows i, i + hd/2):
        (n_heads * hd, in) -> (n_heads, hd/2, 2, in) -> transpose -> (n_heads, 2, hd/2, in)
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_interleaved_to_half: (n_heads, 2, hd/2, in) -> (n_heads, hd/2, 2, in)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(state_dict: dict, config: ModelConfig) -> dict:
    """Our state dict with q/k rows turned from interleaved (Meta, GGUF) to rotate-half."""
    for i in range(config.n_layers):
        wq, wk = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        state_dict[wq] = permute_interleaved_to_half(state_dict[wq], config.n_heads)
        state_dict[wk] = permute_interleaved_to_half(state_dict[wk], config.n_kv_heads)
    return state_dict


# ----------------------------------------------------------------------------- name maps
# {their name: our name}; None marks a tensor we do not need (a cached rotary table).
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w_gate.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w_up.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w_down.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}

HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w_down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

META_NAMES = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{}.attention_norm.weight": "layers.{}.attention_norm.weight",
    "layers.{}.attention.wq.weight": "layers.{}.attention.wq.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attention.wk.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attention.wv.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attention.wo.weight",
    "layers.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "layers.{}.feed_forward.w_gate.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.feed_forward.w_up.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.feed_forward.w_down.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope.freqs": None,
}


def rename(name: str, names: dict) -> str | None:
    """Look a tensor name up in a {their_name: our_name} table; "{}" is the layer number.

    'model.layers.3.mlp.up_proj.weight' -> pattern 'model.layers.{}.mlp.up_proj.weight'
    -> 'layers.{}.feed_forward.w_up.weight' -> 'layers.3.feed_forward.w_up.weight'.
    KeyError if the pattern is not in the table.
    """
    layer = re.search(r"\.(\d+)\.", name)
    target = names[re.sub(r"\.\d+\.", ".{}.", name, count=1)]
    return None if target is None else target.format(layer.group(1) if layer else "")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor a checkpoint must hold, by our name (no output.weight if tied)."""
    D, F, V = config.dim, config.hidden_dim, config.vocab_size
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, D)
    for i in range(config.n_layers):
        shapes.update({
            f"layers.{i}.attention_norm.weight": (D,),
            f"layers.{i}.attention.wq.weight": (q_rows, D),
            f"layers.{i}.attention.wk.weight": (kv_rows, D),
            f"layers.{i}.attention.wv.weight": (kv_rows, D),
            f"layers.{i}.attention.wo.weight": (D, q_rows),
            f"layers.{i}.ffn_norm.weight": (D,),
            f"layers.{i}.feed_forward.w_gate.weight": (F, D),
            f"layers.{i}.feed_forward.w_up.weight": (F, D),
            f"layers.{i}.feed_forward.w_down.weight": (D, F),
        })
    return shapes


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def convert(tensors: dict, names: dict, config: ModelConfig, path) -> dict:
    """Rename their tensors to ours; assert every tensor is used, every shape matches and
    every weight is floating point."""
    expected = expected_shapes(config)
    state_dict = {}
    for their_name, tensor in tensors.items():
        try:
            our_name = rename(their_name, names)
        except KeyError:
            raise CheckpointError(f"{path}: unexpected tensor {their_name!r} (no LLaMA weight has that name)") from None
        if our_name is None:
            continue
        if our_name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {their_name!r} for a config with "
                                  f"{config.n_layers} layers, tie_embeddings={config.tie_embeddings}")
        if tensor.dtype not in WEIGHT_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"{path}: tensor {their_name!r} has dtype {dtype}; "
                                  "weights must be float16, bfloat16, float32 or float64")
        if tuple(tensor.shape) != expected[our_name]:
            raise CheckpointError(f"{path}: shape mismatch for tensor {their_name!r}: expected "
                                  f"{expected[our_name]} from the config, got {tuple(tensor.shape)}")
        state_dict[our_name] = tensor
    missing = [name for name in expected if name not in state_dict]
    if missing:
        ours_to_theirs = {ours: theirs for theirs, ours in names.items() if ours is not None}
        listed = ", ".join(f"{rename(name, ours_to_theirs)!r} (our {name})" for name in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {listed}{more}")
    return state_dict


def tie(state_dict: dict, config: ModelConfig) -> dict:
    """Add output.weight as the embedding itself when tied (model.state_dict() lists both)."""
    if config.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


# ----------------------------------------------------------------------------- GGUF
def open_gguf(path):
    """A gguf.GGUFReader on the file (parses metadata and tensor info; ~3 s for SmolLM2)."""
    import gguf  # only the GGUF path needs it (the GPU machines lack it)

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/... on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e


def read_gguf(path) -> tuple[ModelConfig, dict]:
    """A llama.cpp GGUF file (any quantization gguf can dequantize) -> float32 weights.

    `path` may also be an open GGUFReader (see load_model: the tokenizer reads it too).
    """
    import gguf

    reader = path if isinstance(path, gguf.GGUFReader) else open_gguf(path)
    path = Path(reader.data.filename)  # the file's np.memmap knows its name

    def meta(key, kind=None, default=None):
        """The value of a metadata key, checked to be of `kind` (KINDS) when one is given."""
        field = reader.fields.get(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
            return default
        value = field.contents()
        # float32 metadata (eps, theta) back to its decimal value: 9.99999975e-06 -> 1e-05
        value = float(str(np.float32(value))) if isinstance(value, float) else value
        return value if kind is None else checked(value, kind, key, path)

    arch = meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_heads = meta("llama.attention.head_count", "size")
    with config_errors(path):
        config = ModelConfig(
            dim=meta("llama.embedding_length", "size"),
            n_layers=meta("llama.block_count", "size"),
            n_heads=n_heads,
            n_kv_heads=meta("llama.attention.head_count_kv", "size", n_heads),
            vocab_size=len(tokens.data) if tokens is not None else meta("llama.vocab_size", "size"),
            hidden_dim=meta("llama.feed_forward_length", "size"),
            norm_eps=meta("llama.attention.layer_norm_rms_epsilon", "number"),
            rope_theta=meta("llama.rope.freq_base", "number", 10000.0),
            max_seq_len=meta("llama.context_length", "size"),
            tie_embeddings="output.weight" not in names,
        )
    try:
        # dequantize gives float32 numpy arrays already in torch (out, in) layout
        tensors = {t.name: _to_tensor(gguf.quants.dequantize(t.data, t.tensor_type))
                   for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize GGUF tensors: {type(e).__name__}: {e}") from e
    state_dict = unpermute_qk(convert(tensors, GGUF_NAMES, config, path), config)
    return config, tie(state_dict, config)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """float32 torch tensor of a numpy array (copied if it is a read-only view of the file)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# ----------------------------------------------------------------------------- HF safetensors
def read_hf(directory) -> tuple[ModelConfig, dict]:
    """A transformers LlamaForCausalLM directory: config.json + (sharded) model.safetensors."""
    directory = Path(directory)
    with config_errors(directory / "config.json"):
        config = hf_config(directory / "config.json")
    tensors = {}
    for file in safetensors_files(directory):
        tensors.update(_load_safetensors(file))
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters also write the tied copy
    state_dict = convert(tensors, HF_NAMES, config, directory)
    return config, tie(state_dict, config)


def hf_config(path: Path) -> ModelConfig:
    """ModelConfig from a transformers 4 or 5 LLaMA config.json."""
    hf = _read_json(path)
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    # transformers 5: rope_parameters = {rope_type, rope_theta}; 4: rope_theta + rope_scaling
    if hf.get("rope_parameters"):
        rope = setting(hf, "rope_parameters", "object", path)
    else:
        rope = {**setting(hf, "rope_scaling", "object", path, {}),
                "rope_theta": hf.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    n_heads = setting(hf, "num_attention_heads", "size", path)
    dim = setting(hf, "hidden_size", "size", path)
    unsupported = [what for what, bad in [
        (f"rope_type {rope_type!r}", rope_type != "default"),
        (f"hidden_act {hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
        ("attention_bias", hf.get("attention_bias", False)),
        ("mlp_bias", hf.get("mlp_bias", False)),
        (f"head_dim {hf.get('head_dim')} != hidden_size / heads",
         hf.get("head_dim", dim // n_heads) != dim // n_heads),
    ] if bad]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LLaMA variant: {', '.join(unsupported)}")
    return ModelConfig(
        dim=dim,
        n_layers=setting(hf, "num_hidden_layers", "size", path),
        n_heads=n_heads,
        n_kv_heads=setting(hf, "num_key_value_heads", "size", path, n_heads),
        vocab_size=setting(hf, "vocab_size", "size", path),
        hidden_dim=setting(hf, "intermediate_size", "size", path),
        norm_eps=setting(hf, "rms_norm_eps", "number", path, 1e-6),
        rope_theta=float(setting(rope, "rope_theta", "number", path)),
        max_seq_len=setting(hf, "max_position_embeddings", "size", path, 2048),
        tie_embeddings=setting(hf, "tie_word_embeddings", "flag", path, False),
    )


def safetensors_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json (all of them
    checked by shard_path before any is read)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' in the safetensors index")
        names = list(dict.fromkeys(weight_map.values()))
        return sorted(shard_path(name, directory, index) for name in names)
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    raise CheckpointError(f"{directory}: has config.json but neither model.safetensors "
                          "nor model.safetensors.index.json")


def shard_path(name, directory: Path, index: Path) -> Path:
    """directory / name for a shard the index names, if that is a file inside the directory.

    The index is data: a name that is absolute, climbs out with '..' or is a symlink to a
    file elsewhere is refused unread. One exception, the Hugging Face hub cache, whose
    <repo>/snapshots/<revision>/ holds links to the repository's own <repo>/blobs/.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map names {name!r}, not a file name")
    path = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: weight_map names {name!r}, a path outside {directory}; refused")
    target, home = path.resolve(), directory.resolve()
    hub_blob = home.parent.name == "snapshots" and target.parent == home.parent.parent / "blobs"
    if not (target.is_relative_to(home) or hub_blob):
        raise CheckpointError(f"{index}: weight_map names {name!r}, which links to {target}, "
                              f"outside {directory}; refused")
    if not path.exists():
        raise CheckpointError(f"{index}: weight_map names {name!r}, which is missing from {directory}")
    return path


def _load_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- Meta
# How Meta's model-parallel layers split a weight across consolidated.NN.pth shards:
# column-parallel (split output rows) along 0, row-parallel (split input columns) along 1.
# Norms are copied into every shard. The embedding is decided by its shape (below).
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def read_meta(directory) -> tuple[ModelConfig, dict]:
    """A Meta LLaMA directory: params.json + consolidated.00.pth (.. consolidated.NN.pth)."""
    directory = Path(directory)
    params = _read_json(directory / "params.json")
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{directory}: has params.json but no consolidated.*.pth")
    tensors = merge_meta_shards([_load_pth(f) for f in files], params.get("dim"), directory)
    with config_errors(directory / "params.json"):
        config = meta_config(params, tensors, directory / "params.json")
    state_dict = unpermute_qk(convert(tensors, META_NAMES, config, directory), config)
    return config, tie(state_dict, config)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width exactly as Meta's FeedForward computes it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)  # round up


def meta_config(params: dict, tensors: dict, path: Path) -> ModelConfig:
    """ModelConfig from params.json (vocab_size -1, as in LLaMA-2, is read off the embedding)."""
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{path}: use_scaled_rope (LLaMA-3.1 rope scaling) is not supported")
    if params.get("vocab_size", -1) == -1:  # LLaMA-2: as many as the tokenizer, the embedding's rows
        embedding = tensors.get("tok_embeddings.weight")
        if embedding is None or embedding.dim() != 2:
            raise CheckpointError(f"{path}: vocab_size -1 is read off the embedding, but there is no "
                                  "2-d tensor 'tok_embeddings.weight'")
        vocab_size = embedding.shape[0]
    else:
        vocab_size = setting(params, "vocab_size", "size", path)
    dim, n_heads = setting(params, "dim", "size", path), setting(params, "n_heads", "size", path)
    hidden_dim = meta_hidden_dim(dim, setting(params, "multiple_of", "size", path, 256),
                                 setting(params, "ffn_dim_multiplier", "number", path, None))
    return ModelConfig(
        dim=dim,
        n_layers=setting(params, "n_layers", "size", path),
        n_heads=n_heads,
        n_kv_heads=setting(params, "n_kv_heads", "size", path, n_heads),
        vocab_size=vocab_size,
        hidden_dim=hidden_dim,
        norm_eps=setting(params, "norm_eps", "number", path, 1e-5),
        rope_theta=float(setting(params, "rope_theta", "number", path, 10000.0)),
        max_seq_len=setting(params, "max_seq_len", "size", path, 4096),
        tie_embeddings="output.weight" not in tensors,
    )


def merge_meta_shards(shards: list[dict], dim: int, directory: Path) -> dict:
    """Concatenate model-parallel shards into full tensors (one shard: returned as is)."""
    if len(shards) == 1:
        return shards[0]
    if any(s.keys() != shards[0].keys() for s in shards):
        raise CheckpointError(f"{directory}: consolidated.*.pth shards hold different tensor names")
    merged = {}
    for name, first in shards[0].items():
        parts = [s[name] for s in shards]
        if name == "tok_embeddings.weight":  # LLaMA-2 splits the width, LLaMA-3 the vocabulary
            cat_dim = 0 if first.dim() == 2 and first.shape[1] == dim else 1
        else:
            cat_dim = META_SHARD_DIM.get(name.split(".")[-2] if "." in name else name)  # 'wq', 'output'..
        try:
            merged[name] = first if cat_dim is None else torch.cat(parts, dim=cat_dim)
        except (RuntimeError, IndexError) as e:  # sizes that differ, or too few dimensions
            shapes = ", ".join(str(tuple(part.shape)) for part in parts)
            raise CheckpointError(f"{directory}: cannot concatenate the shards of {name!r}: shapes {shapes} "
                                  f"along dimension {cat_dim}") from e
    return merged


def _load_pth(path: Path) -> dict:
    """{name: tensor} from a .pth file. weights_only: tensors and plain containers are all it
    unpickles, never code. The zip format (torch >= 1.6) is memory-mapped; the legacy format,
    which cannot be, is read into memory."""
    try:
        with open(path, "rb") as f:
            zip_format = f.read(4) == b"PK\x03\x04"
        tensors = torch.load(path, weights_only=True, map_location="cpu", mmap=zip_format)
    except Exception as e:  # RuntimeError from the zip reader, UnpicklingError, ...
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if culprit:  # weights_only refused a class or function
            raise CheckpointError(f"{path}: refused: it holds a pickled {culprit.group(1)}, not only tensors "
                                  "(unpickling it could run code)") from e
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from e
    problem = _not_tensors_by_name(tensors)
    if problem:
        raise CheckpointError(f"{path}: expected a dict of tensors by name, {problem}")
    return tensors


def _not_tensors_by_name(obj) -> str | None:
    """What keeps obj from being a {str: Tensor} dict ('got list', ...), or None if nothing."""
    if not isinstance(obj, dict):
        return f"got {type(obj).__name__}"
    for name, value in obj.items():
        if not isinstance(name, str):
            return f"got a dict with the key {name!r}"
        if not isinstance(value, torch.Tensor):
            return f"got {type(value).__name__} for {name!r}"
    return None


def _read_json(path: Path) -> dict:
    """The JSON object in a file; a CheckpointError names the file if it is absent, damaged or no object."""
    try:
        obj = read_json(path)
    except (OSError, ValueError) as e:  # their messages name the file
        raise CheckpointError(str(e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- detection, loading
def checkpoint_format(path) -> str:
    """'gguf' (a .gguf file), 'hf' (dir with config.json) or 'meta' (dir with params.json)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if path.suffix == ".gguf" or f.read(4) == b"GGUF":
                return "gguf"
    elif (path / "config.json").is_file():
        return "hf"
    elif (path / "params.json").is_file():
        return "meta"
    what = "does not exist" if not path.exists() else "is an unknown checkpoint format"
    raise CheckpointError(f"{path}: {what}: expected a .gguf file, a directory with config.json "
                          "(HF safetensors) or a directory with params.json (Meta)")


READERS = {"gguf": read_gguf, "hf": read_hf, "meta": read_meta}


def read_checkpoint(path) -> tuple[ModelConfig, dict]:
    """(config, state dict with our names and rotate-half q/k) from any supported format."""
    return READERS[checkpoint_format(path)](path)


def load_model(path=None, *, device="cpu", dtype=torch.float32, require_tokenizer=False):
    """(Transformer in eval mode, Tokenizer or None) from a checkpoint; None = SmolLM2 GGUF.

    require_tokenizer: a checkpoint without a tokenizer we can read is an error that lists
    the files searched, instead of giving None. The config and weights are read first, so a
    foreign architecture or a broken config.json is reported as such, not as a missing tokenizer.
    """
    path = assets.fetch("smollm2-135m-instruct") if path is None else path
    if checkpoint_format(path) == "gguf":  # parse the file once for weights and vocabulary
        reader = open_gguf(path)
        config, state_dict = read_gguf(reader)
        tokenizer = gguf_tokenizer(reader, required=require_tokenizer)
    else:
        config, state_dict = read_checkpoint(path)
        tokenizer = load_tokenizer(path, required=require_tokenizer)
    if tokenizer is not None and tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer ({tokenizer.name}) has {tokenizer.n_vocab} ids "
                              f"but the model's embedding only {config.vocab_size} rows")
    with torch.device("meta"):  # no memory and no random init: the checkpoint fills it
        model = Transformer(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:  # assign gave output its own Parameter: share the embedding again
        model.output.weight = model.tok_embeddings.weight
    model.to(device=device, dtype=dtype)  # in place: tied embeddings stay one Parameter
    return model.eval(), tokenizer


def load_tokenizer(path, *, required=False):
    """The tokenizer stored with a checkpoint, built without transformers:
    - a GGUF file: its vocabulary;
    - a directory: tokenizer.json (byte-level BPE; tokenizer_config.json next to it gives
      bos/eos/pad and the chat template), else a LLaMA-3 tiktoken tokenizer.model (also
      under original/, where HF LLaMA-3 repositories keep Meta's file).
    None when there is none; a SentencePiece tokenizer.model is passed over. required=True
    turns None into a CheckpointError listing what was searched. A tokenizer file that is
    there but cannot be read (e.g. a SentencePiece-style tokenizer.json) is an error."""
    path = Path(path)
    if checkpoint_format(path) == "gguf":
        return gguf_tokenizer(open_gguf(path), required=required)
    searched = []
    for candidate in (path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if not candidate.is_file():
            searched.append(f"{candidate} (absent)")
        elif candidate.name == "tokenizer.json":
            if candidate.with_name("tokenizer_config.json").is_file():  # read with it: a JSON object?
                _read_json(candidate.with_name("tokenizer_config.json"))
            return _tokenizer_or_error(Tokenizer.from_hf_json, candidate)
        elif is_tiktoken_file(candidate):
            return _tokenizer_or_error(Tokenizer.from_llama3, candidate)
        else:
            searched.append(f"{candidate} (not a tiktoken BPE file: SentencePiece is not supported)")
    return _required(None, required, path, searched)


def _required(tokenizer, required: bool, path, searched: list[str]):
    if tokenizer is None and required:
        raise CheckpointError(f"{path}: no tokenizer found; searched " + "; ".join(searched))
    return tokenizer


def _tokenizer_or_error(build, source) -> Tokenizer:
    """build(source), with the tokenizer's ValueError (it names the file) as a CheckpointError,
    and the KeyError, TypeError, ... of a file not structured as expected as one naming it."""
    try:
        return build(source)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        file = source.data.filename if hasattr(source, "fields") else source  # a GGUFReader or a path
        raise CheckpointError(f"{file}: cannot build a tokenizer from it (damaged?): "
                              f"{type(e).__name__}: {e}") from e


def gguf_tokenizer(reader, *, required=False):
    """The vocabulary a GGUF carries as a Tokenizer, or None when it has none."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        path = reader.data.filename
        return _required(None, required, path, [f"{path} (no tokenizer.ggml.tokens in its metadata)"])
    return _tokenizer_or_error(Tokenizer.from_gguf, reader)


def is_tiktoken_file(path: Path) -> bool:
    """True for a tiktoken BPE file (LLaMA-3): lines 'base64(token bytes) rank'."""
    with open(path, "rb") as f:
        first = f.readline().split()
    try:
        return len(first) == 2 and int(first[1]) >= 0 and len(base64.b64decode(first[0], validate=True)) > 0
    except ValueError:  # binascii.Error is a ValueError too
        return False


# ----------------------------------------------------------------------------- writers
def _write_safetensors(path: Path, tensors: dict) -> None:
    """tensors as a safetensors file, atomically; an I/O error is the OSError atomic_write names."""
    def write(tmp):
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # "... I/O error: Permission denied (os error 13) at path ..."
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e

    atomic_write(path, write)


def _write_pth(path: Path, tensors: dict) -> None:
    """tensors as a (zip format) .pth file, atomically; the file is opened here so that a
    failure is an OSError, not torch's RuntimeError."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(tensors, f)

    atomic_write(path, write)


def _our_tensors(model: Transformer) -> dict:
    """The model's checkpoint tensors by our name (output.weight left out when tied)."""
    state_dict = model.state_dict()
    missing = [name for name in expected_shapes(model.config) if name not in state_dict]
    if missing:
        raise CheckpointError(f"model has no tensor(s) {missing[:4]}: merge and remove LoRA "
                              "adapters before saving a base checkpoint")
    return {name: state_dict[name].detach().cpu().contiguous() for name in expected_shapes(model.config)}


def _hf_config_json(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for transformers 5 LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(model: Transformer, directory, *, shard_size: int | None = None) -> None:
    """Write config.json + model.safetensors (rotate-half q/k, as HF stores them).

    shard_size (bytes): split the tensors into model-0000i-of-0000n.safetensors files of at
    most that size (a bigger single tensor gets a file of its own) plus
    model.safetensors.index.json. config.json is written last.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ours_to_hf = {ours: theirs for theirs, ours in HF_NAMES.items() if ours is not None}
    tensors = {rename(name, ours_to_hf): tensor for name, tensor in _our_tensors(model).items()}
    index = directory / "model.safetensors.index.json"
    if shard_size is None:
        _write_safetensors(directory / "model.safetensors", tensors)
        index.unlink(missing_ok=True)  # a stale index would shadow model.safetensors
    else:
        shards = _pack(tensors, shard_size)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(directory / file, shard)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    dtype = next(iter(tensors.values())).dtype
    write_json(directory / "config.json", _hf_config_json(model.config, dtype), indent=2)


def _pack(tensors: dict, shard_size: int) -> list[dict]:
    """Split tensors, in order, into consecutive groups of at most shard_size bytes."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def meta_ffn_params(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which meta_hidden_dim gives hidden_dim back."""
    if meta_hidden_dim(dim, 256, None) == hidden_dim:  # LLaMA-2's own choice
        return 256, None
    base = int(2 * (4 * dim) / 3)
    # multiple_of = hidden_dim rounds any width in (0, hidden_dim] up to hidden_dim
    return hidden_dim, (None if base <= hidden_dim else hidden_dim / base)


def _interleaved_tensors(model: Transformer) -> dict:
    """_our_tensors with the q/k rows turned back to the interleaved rotary layout (Meta, GGUF)."""
    config, tensors = model.config, _our_tensors(model)
    for i in range(config.n_layers):
        for name, heads in ((f"layers.{i}.attention.wq.weight", config.n_heads),
                            (f"layers.{i}.attention.wk.weight", config.n_kv_heads)):
            tensors[name] = permute_half_to_interleaved(tensors[name], heads)
    return tensors


def save_meta(model: Transformer, directory) -> None:
    """Write params.json + consolidated.00.pth with Meta names and interleaved q/k rows."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    ours_to_meta = {ours: theirs for theirs, ours in META_NAMES.items() if ours is not None}
    tensors = {rename(name, ours_to_meta): tensor for name, tensor in _interleaved_tensors(model).items()}
    _write_pth(directory / "consolidated.00.pth", tensors)
    multiple_of, ffn_dim_multiplier = meta_ffn_params(config.dim, config.hidden_dim)
    params = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_seq_len": config.max_seq_len,
    }
    write_json(directory / "params.json", params, indent=2)


def save_gguf(model: Transformer, path, *, name: str = "", tokenizer_fields: dict | None = None) -> None:
    """Write one float16 GGUF file that llama.cpp reads as a llama model.

    Tensors get llama.cpp's names (GGUF_NAMES), q/k rows go back to the interleaved rotary
    layout, norms stay float32 and matrices (embedding included) become float16; tied
    embeddings are written once (no output.weight). The metadata holds the llama.* keys
    llama.cpp needs for this architecture (no rope scaling: model.py has none).

    tokenizer_fields: {key: (value, GGUFValueType)}, e.g. {"tokenizer.ggml.model":
    ("gpt2", STRING), "tokenizer.ggml.tokens": ([...], STRING)}; a list value is written as
    an array of that type. Without them the file declares no vocabulary
    (tokenizer.ggml.model "none") and llama.vocab_size gives the embedding's rows.
    """
    import gguf

    from loranull_mini.files import atomic_write

    config, path = model.config, Path(path)
    ours_to_gguf = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
    tensors = {}
    for our_name, tensor in _interleaved_tensors(model).items():
        array = tensor.float().numpy() if tensor.dim() == 1 else tensor.to(torch.float16).numpy()
        if not np.isfinite(array).all():
            raise CheckpointError(f"{our_name} has values float16 cannot hold (beyond +-65504, or NaN)")
        tensors[rename(our_name, ours_to_gguf)] = array
    fields = dict(tokenizer_fields or {"tokenizer.ggml.model": ("none", gguf.GGUFValueType.STRING)})

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(name or "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    for key, (value, vtype) in fields.items():
        if isinstance(value, (list, tuple)):
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    for gguf_name, array in tensors.items():
        writer.add_tensor(gguf_name, array)

    def write(tmp):
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
