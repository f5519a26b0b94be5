"""Saving, loading and exporting LoRA adapters.

Three on-disk forms, each a directory with one safetensors file and one json config:

save_adapter -> adapter.safetensors + adapter_config.json
    A, B of every layer, plus the starting factors A0, B0 of layers whose init moved weight
    out of the base (PiSSA, MiLoRA, CorDA, LoRA-Null). The residual is not stored: it is
    rebuilt from the original base weights, W_res = W - s * B0 @ A0. The config records r,
    alpha, init, targets, freeze_A and a fingerprint of the original base weights, so
    load_adapter refuses a different base model.

export_delta -> the same layout, as a plain additive adapter on the ORIGINAL weights:
    W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * [B | -B0] @ [A; A0]
    so A' = [A; A0] (2r, n), B' = [B | -B0] (m, 2r). The scale s stays alpha / r, so the
    exported alpha is s * 2r. Vanilla LoRA (W_res = W) exports A, B as they are.
    load_adapter reads it like any adapter without residual.

export_peft -> adapter_model.safetensors + adapter_config.json in the layout of Hugging
    Face PEFT (checked against peft 0.21.2): the plain delta, under the names of
    transformers' LlamaForCausalLM, loadable with PeftModel.from_pretrained on the original
    HF weights.

All files are written atomically (a temporary file, then os.replace).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora import (LoRALinear, lora_layers, lora_state_dict, mark_only_lora_trainable, residual_weight,
                  tensor_sha256, wrap_linear)
from model import PROJECTIONS

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"

# Our module path inside a block -> transformers' LlamaForCausalLM path.
HF_PROJECTIONS = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w_gate": "mlp.gate_proj", "feed_forward.w_up": "mlp.up_proj",
    "feed_forward.w_down": "mlp.down_proj",
}


# ----------------------------------------------------------------------------------------
# Atomic writes


def _atomic_write(path: Path, write):
    """write(tmp_path) then rename over path: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _write_json(path: Path, obj: dict):
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


# ----------------------------------------------------------------------------------------
# Which base model an adapter belongs to


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the name and sha256 of every ORIGINAL base tensor of the model.

    For a wrapped layer the original weight may already be replaced by a residual, so its
    hash is the one the LoRALinear recorded before its init ran. The adapter's own tensors
    (A, B, A0, B0) are left out. An un-adapted model and the same model with adapters
    therefore have the same fingerprint.
    """
    layers = lora_layers(model)
    hashes = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:                                       # A, B, A0, B0
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in layers:
            name = owner[: -len(".base")]
            key = f"{name}.{leaf}"                                # the name it has unwrapped
            if leaf == "weight":
                hashes[key] = layers[name].base_sha256
                continue
        hashes[key] = tensor_sha256(t)
    h = hashlib.sha256()
    for key in sorted(hashes):
        h.update(f"{key}={hashes[key]}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Our format


def _short_targets(layers) -> list[str]:
    """layers.0.attention.wq, layers.0.feed_forward.w_up, ... -> ["q", "up"]."""
    paths = {name.split(".", 2)[2] for name in layers}      # "attention.wq", ...
    return [short for short, path in PROJECTIONS.items() if path in paths]


def _adapter_config(layers: dict[str, LoRALinear], config: dict | None, model) -> dict:
    """The json config: the caller's fields (e.g. base path, training run) plus what the
    layers themselves know, which must agree with the caller's."""
    first = next(iter(layers.values()))
    derived = {
        "init": first.method, "r": first.r, "alpha": first.alpha, "freeze_A": first.freeze_A,
        "dropout": first.dropout_p, "targets": _short_targets(layers), "layers": sorted(layers),
        "base_fingerprint": base_fingerprint(model),
    }
    config = dict(config or {})
    clash = {k: (config[k], v) for k, v in derived.items() if k in config and config[k] != v}
    if clash:
        raise ValueError(f"config disagrees with the model's adapters (given, actual): {clash}")
    # "method" is a free label for tables (e.g. "null-v2"); by default the init's name.
    default_label = first.method + ("-v2" if first.method == "null" and first.freeze_A else "")
    return {"method": default_label, **config, **derived}


def save_adapter(model: torch.nn.Module, dir, config: dict | None = None) -> Path:
    """Write adapter.safetensors (A, B, and A0, B0 where the init moved weight) and
    adapter_config.json into dir: the caller's config (e.g. base model path, training
    settings; "method" is a free label, by default the init's name, "null-v2" for LoRA-Null
    v2) plus what the adapters determine: init, r, alpha, freeze_A, dropout, targets,
    layers and the base-model fingerprint."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(dir / ADAPTER_WEIGHTS, lora_state_dict(model))
    _write_json(dir / ADAPTER_CONFIG, _adapter_config(layers, config, model))
    return dir


def load_adapter(model: torch.nn.Module, dir) -> dict[str, LoRALinear]:
    """Wrap the layers of a plain base model and restore a saved (or exported) adapter.

    The model must hold the same original weights the adapter was trained on (checked by
    fingerprint). Layers with A0, B0 get the residual W_res = W - s * B0 @ A0 as base.
    Returns {module name: LoRALinear}, with only the adapter parameters trainable.
    """
    dir = Path(dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (dir / f).is_file():
            hint = " (this looks like a PEFT export: load it with peft)" if (dir / PEFT_WEIGHTS).is_file() else ""
            raise FileNotFoundError(f"no {f} in {dir}{hint}")
    try:
        cfg = json.loads((dir / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(dir / ADAPTER_WEIGHTS))
    except Exception as e:
        raise ValueError(f"cannot read the adapter in {dir}: {e}") from None
    missing = [k for k in ("base_fingerprint", "layers", "r", "alpha", "init", "dropout", "freeze_A") if k not in cfg]
    if missing:
        raise ValueError(f"{dir / ADAPTER_CONFIG} is not a loranull-mini adapter config: missing {missing}")
    if lora_layers(model):
        raise ValueError("load_adapter needs a plain base model, but this one already has LoRA adapters")
    found = base_fingerprint(model)
    if found != cfg["base_fingerprint"]:
        where = f" ({cfg['base_model']})" if "base_model" in cfg else ""
        raise ValueError(f"adapter in {dir} was made for a different base model (weights or dtype differ): "
                         f"fingerprint {cfg['base_fingerprint'][:12]}..., this model {found[:12]}...; "
                         f"load the checkpoint it was trained on{where}")
    layers = {}
    for name in cfg["layers"]:
        layer = wrap_linear(model, name, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["freeze_A"])
        restore_layer(layer, tensors, name, cfg["init"])
        layers[name] = layer
    mark_only_lora_trainable(model)
    return layers


@torch.no_grad()
def restore_layer(layer: LoRALinear, tensors: dict, name: str, init: str):
    """Put saved {name.A, name.B[, name.A0, name.B0]} into a fresh layer wrapping the
    ORIGINAL weight; with A0, B0 the base becomes the residual W - s * B0 @ A0."""
    if f"{name}.A0" in tensors:
        # Rebuild the residual the init left in the base: W_res = W - s * B0 @ A0.
        A0, B0 = tensors[f"{name}.A0"].to(layer.A.device), tensors[f"{name}.B0"].to(layer.A.device)
        W = layer.base.weight
        layer.initialize(A0, B0, residual_weight(W, A0, B0, layer.scaling), init)
    layer.method = init
    layer.A.copy_(tensors[f"{name}.A"])
    layer.B.copy_(tensors[f"{name}.B"])


# ----------------------------------------------------------------------------------------
# The plain delta on the original weights


def plain_delta(layer: LoRALinear, with_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with W + s * B' @ A' == W_res + s * B @ A, float32.

    with_residual: append the starting factors, A' = [A; A0] (2r, n), B' = [B | -B0] (m, 2r);
    a layer whose init left W alone gets zero blocks, so all layers share one rank.
    """
    A, B = layer.A.detach().float(), layer.B.detach().float()
    if not with_residual:
        return A, B
    A0 = layer.A0 if layer.has_residual else torch.zeros_like(A)
    B0 = layer.B0 if layer.has_residual else torch.zeros_like(B)
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def _plain_deltas(model) -> tuple[dict[str, tuple], int, float]:
    """{name: (A', B')}, the common rank r' and alpha' = s * r' (so alpha' / r' = s)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    if len({(l.r, l.scaling) for l in layers.values()}) > 1:
        raise ValueError("exporting needs one rank and one alpha for all layers")
    with_residual = any(l.has_residual for l in layers.values())
    deltas = {name: plain_delta(l, with_residual) for name, l in layers.items()}
    first = next(iter(layers.values()))
    rank = first.r * (2 if with_residual else 1)
    alpha = first.scaling * rank
    return deltas, rank, (int(alpha) if float(alpha).is_integer() else alpha)


def export_delta(model: torch.nn.Module, dir, config: dict | None = None) -> Path:
    """Write the plain delta in our adapter format (no A0, B0): load_adapter applies it to
    the original base weights and gives the adapted model."""
    deltas, rank, alpha = _plain_deltas(model)
    layers = lora_layers(model)
    cfg = _adapter_config(layers, {k: v for k, v in (config or {}).items() if k not in ("r", "alpha")}, model)
    cfg.update(r=rank, alpha=alpha, plain_delta=True)
    tensors = {}
    for name, (A, B) in deltas.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A, B
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(dir / ADAPTER_WEIGHTS, tensors)
    _write_json(dir / ADAPTER_CONFIG, cfg)
    return dir


# ----------------------------------------------------------------------------------------
# Hugging Face PEFT


def hf_module_name(name: str) -> str:
    """layers.3.attention.wq -> model.layers.3.self_attn.q_proj (LlamaForCausalLM)."""
    layers, i, rest = name.split(".", 2)
    if layers != "layers" or rest not in HF_PROJECTIONS:
        raise ValueError(f"no Hugging Face name for module {name}")
    return f"model.layers.{i}.{HF_PROJECTIONS[rest]}"


def export_peft(model: torch.nn.Module, dir, base_model_name_or_path: str | None = None) -> Path:
    """Write the plain delta as a PEFT LoRA adapter for transformers' LlamaForCausalLM.

    Keys: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (r', in) and
    .lora_B.weight (out, r'); PEFT's scale is lora_alpha / r = s, as ours.
    """
    deltas, rank, alpha = _plain_deltas(model)
    tensors = {}
    for name, (A, B) in deltas.items():
        prefix = f"base_model.model.{hf_module_name(name)}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    first = next(iter(lora_layers(model).values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in map(hf_module_name, deltas)}),
        "lora_dropout": first.dropout_p,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(dir / PEFT_WEIGHTS, tensors)
    _write_json(dir / PEFT_CONFIG, config)
    return dir
