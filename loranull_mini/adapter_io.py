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

Every file is written atomically (loranull_mini/files.py) and only after a finite check;
load_adapter verifies the config, the tensor names, shapes, dtypes, values and the
sha256 recorded at save time before it touches the model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora import (LoRALinear, lora_layers, lora_state_dict, mark_only_lora_trainable, residual_weight,
                  update_factors, wrap_linear)
from loranull_mini.files import (atomic_directory, atomic_write, read_json, restore_directory, tensor_sha256,
                                 tensors_sha256, write_json)
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


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _write_json(path: Path, obj: dict):
    write_json(path, obj, indent=2)


def config_sha256(cfg: dict) -> str:
    """sha256 of every config field but itself: an edited alpha, r, init ... is recognised."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()


def _write_adapter(dir: Path, weights: str, tensors: dict, cfg: dict) -> Path:
    """The adapter's two files as one unit: a kill leaves the old directory or the new one."""
    cfg = {**cfg, "config_sha256": config_sha256(cfg)}

    def write(tmp):
        _write_safetensors(tmp / weights, tensors)
        _write_json(tmp / ADAPTER_CONFIG, cfg)
    return atomic_directory(dir, write)


# ----------------------------------------------------------------------------------------
# Which base model an adapter belongs to


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the name and sha256 of every ORIGINAL base tensor of the model.

    A wrapped layer counts under its unwrapped name and the adapters' own tensors (A, B,
    A0, B0) are left out, so a plain model and the same model with fresh vanilla adapters
    have the same fingerprint. An init that moved weight into the adapter replaced W by a
    residual whose original bits cannot be recovered: take the fingerprint before the init
    (train.py does) and pass it to save_adapter.
    """
    layers = lora_layers(model)
    moved = [name for name, layer in layers.items() if layer.has_residual or layer.merged]
    if moved:
        raise ValueError(f"the base weights of {moved[0]} (and {len(moved) - 1} more) are no longer the "
                         f"original ones (residual or merged): compute base_fingerprint before the init")
    hashes = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:                                       # A, B (A0, B0)
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in layers:
            key = f"{owner[: -len('.base')]}.{leaf}"              # the name it has unwrapped
        hashes[key] = tensor_sha256(t)
    h = hashlib.sha256()
    for key in sorted(hashes):
        h.update(f"{key}={hashes[key]}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Our format

FORMAT = "loranull-mini adapter"
RESIDUAL_INITS = {"pissa", "milora", "corda", "null"}  # inits that move weight into the adapter (A0, B0)


def _short_targets(layers) -> list[str]:
    """layers.0.attention.wq, layers.0.feed_forward.w_up, ... -> ["q", "up"]."""
    paths = {name.split(".", 2)[2] for name in layers}      # "attention.wq", ...
    return [short for short, path in PROJECTIONS.items() if path in paths]


def _adapter_config(model, tensors: dict, config: dict | None, r: int, alpha: float) -> dict:
    """The json config: the caller's fields (init, base model, training run ...) plus what
    the layers and tensors determine, which must agree with the caller's."""
    layers = lora_layers(model)
    config = dict(config or {})
    if config.get("init") not in nullspace_inits():
        raise ValueError(f"save_adapter needs config['init'], one of {sorted(nullspace_inits())}; "
                         f"got {config.get('init')!r}")
    if "base_fingerprint" not in config:
        config["base_fingerprint"] = base_fingerprint(model)  # refuses once the weights moved
    first = next(iter(layers.values()))
    derived = {"format": FORMAT, "r": r, "alpha": alpha, "freeze_A": first.freeze_A, "dropout": first.dropout_p,
               "targets": _short_targets(layers), "layers": sorted(layers), "tensors_sha256": tensors_sha256(tensors)}
    clash = {k: (config[k], v) for k, v in derived.items() if k in config and config[k] != v}
    if clash:
        raise ValueError(f"config disagrees with the model's adapters (given, actual): {clash}")
    # "method" is a free label for tables (e.g. "null-v2"); by default the init's name.
    label = config["init"] + ("-v2" if config["init"] == "null" and first.freeze_A else "")
    return {"method": label, **config, **derived}


def nullspace_inits() -> set[str]:
    from nullspace import INITS  # the table of inits; adapter files only need its names
    return set(INITS)


def _checked_tensors(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """float32, finite, contiguous CPU copies: nothing else is written."""
    out = {}
    for key, t in tensors.items():
        t = t.detach().float().contiguous().cpu()
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {key} holds NaN/Inf values; not saved (the training diverged?)")
        out[key] = t
    return out


def save_adapter(model: torch.nn.Module, dir, config: dict) -> Path:
    """Write adapter.safetensors (A, B, and A0, B0 where the init moved weight) and
    adapter_config.json into dir.

    config: the caller's fields; "init" is required (a name of nullspace.INITS), and
    "base_fingerprint" unless the base weights are still the original ones (see
    base_fingerprint); "method" is a free label (default: the init's name, "null-v2" for
    LoRA-Null v2). Added: r, alpha, freeze_A, dropout, targets, layers and a sha256 of the
    adapter tensors, which load_adapter checks.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = _checked_tensors(lora_state_dict(model), f"adapter for {dir}")
    first = next(iter(layers.values()))
    cfg = _adapter_config(model, tensors, config, first.r, first.alpha)
    return _write_adapter(Path(dir), ADAPTER_WEIGHTS, tensors, cfg)


def read_adapter(dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter directory, both verified: the config names its
    layers, r, alpha, init; the tensors are exactly those the config's layers need (A, B,
    and A0, B0 for an init that moved weight), float32, finite, of one consistent rank,
    and hash to the sha256 recorded at save time."""
    dir = restore_directory(dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (dir / f).is_file():
            hint = " (this looks like a PEFT export: load it with peft)" if (dir / PEFT_WEIGHTS).is_file() else ""
            raise FileNotFoundError(f"no {f} in {dir}{hint}")
    cfg = read_json(dir / ADAPTER_CONFIG)
    where = dir / ADAPTER_CONFIG
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} is not a loranull-mini adapter config (not a JSON object)")
    missing = [k for k in ("base_fingerprint", "layers", "r", "alpha", "init", "dropout", "freeze_A",
                           "tensors_sha256", "config_sha256") if k not in cfg]
    if missing:
        raise ValueError(f"{where} is not a loranull-mini adapter config: missing {missing}")
    if not (isinstance(cfg["r"], int) and cfg["r"] > 0 and isinstance(cfg["alpha"], (int, float))
            and cfg["alpha"] > 0 and isinstance(cfg["layers"], list) and cfg["layers"]):
        raise ValueError(f"{where}: r must be a positive integer, alpha positive and layers a non-empty list")
    if config_sha256(cfg) != cfg["config_sha256"]:
        raise ValueError(f"{where} does not match the sha256 recorded in it: the config (alpha, r, init ...) was "
                         f"edited or damaged after it was saved; restore it or train the adapter again")
    try:
        tensors = load_file(str(dir / ADAPTER_WEIGHTS))
    except Exception as e:
        raise ValueError(f"cannot read {dir / ADAPTER_WEIGHTS} (truncated or corrupted?): {e}") from None
    residual = cfg["init"] in RESIDUAL_INITS and not cfg.get("plain_delta", False)
    keys = ("A", "B", "A0", "B0") if residual else ("A", "B")
    expected = {f"{name}.{k}" for name in cfg["layers"] for k in keys}
    absent, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if absent or extra:
        raise ValueError(f"{dir / ADAPTER_WEIGHTS} does not hold the tensors its config needs "
                         f"(init {cfg['init']!r}, {len(cfg['layers'])} layers): "
                         + (f"missing {absent[:4]}{'...' if len(absent) > 4 else ''}" if absent else "")
                         + ("; " if absent and extra else "")
                         + (f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else ""))
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{dir / ADAPTER_WEIGHTS}: {key} is {t.dtype}, expected torch.float32")
        rank = t.shape[0] if key.endswith((".A", ".A0")) else t.shape[-1]
        if t.ndim != 2 or rank != cfg["r"]:
            raise ValueError(f"{dir / ADAPTER_WEIGHTS}: {key} has shape {tuple(t.shape)}, not rank r={cfg['r']}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{dir / ADAPTER_WEIGHTS}: {key} holds NaN/Inf values")
    if tensors_sha256(tensors) != cfg["tensors_sha256"]:
        raise ValueError(f"{dir / ADAPTER_WEIGHTS} does not match the sha256 recorded in {where}: "
                         f"the file was changed or damaged after it was saved")
    return cfg, tensors


def load_adapter(model: torch.nn.Module, dir) -> dict[str, LoRALinear]:
    """Wrap the layers of a plain base model and restore a saved (or exported) adapter.

    The adapter is verified (read_adapter), and the model must hold the original weights it
    was trained on (checked by fingerprint) and every layer it names, with matching shapes.
    Layers with A0, B0 get the residual W_res = W - s * B0 @ A0 as base. Returns
    {module name: LoRALinear}, with only the adapter parameters trainable.
    """
    dir = Path(dir)
    cfg, tensors = read_adapter(dir)
    if lora_layers(model):
        raise ValueError("load_adapter needs a plain base model, but this one already has LoRA adapters")
    found = base_fingerprint(model)
    if found != cfg["base_fingerprint"]:
        where = f" ({cfg['base_model']})" if "base_model" in cfg else ""
        raise ValueError(f"adapter in {dir} was made for a different base model (weights or dtype differ): "
                         f"fingerprint {cfg['base_fingerprint'][:12]}..., this model {found[:12]}...; "
                         f"load the checkpoint it was trained on{where}")
    modules = dict(model.named_modules())
    for name in cfg["layers"]:
        if not isinstance(modules.get(name), torch.nn.Linear):
            raise ValueError(f"{dir / ADAPTER_CONFIG} names layer {name!r}, which is not a linear layer "
                             f"of this model")
        m, n = modules[name].weight.shape
        if tensors[f"{name}.A"].shape[1] != n or tensors[f"{name}.B"].shape[0] != m:
            raise ValueError(f"{dir / ADAPTER_WEIGHTS}: the adapter of {name} is for a ({tensors[f'{name}.B'].shape[0]}, "
                             f"{tensors[f'{name}.A'].shape[1]}) weight, this model's is ({m}, {n})")
    layers = {}
    for name in cfg["layers"]:
        layer = wrap_linear(model, name, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["freeze_A"])
        restore_layer(layer, tensors, name)
        layers[name] = layer
    mark_only_lora_trainable(model)
    return layers


@torch.no_grad()
def restore_layer(layer: LoRALinear, tensors: dict, name: str):
    """Put saved {name.A, name.B[, name.A0, name.B0]} into a fresh layer wrapping the
    ORIGINAL weight; with A0, B0 the base becomes the residual W - s * B0 @ A0."""
    if f"{name}.A0" in tensors:
        A0, B0 = tensors[f"{name}.A0"].to(layer.A.device), tensors[f"{name}.B0"].to(layer.A.device)
        layer.initialize(A0, B0, residual_weight(layer.base.weight, A0, B0, layer.scaling))
    layer.A.copy_(tensors[f"{name}.A"])
    layer.B.copy_(tensors[f"{name}.B"])


# ----------------------------------------------------------------------------------------
# The plain delta on the original weights


def _plain_deltas(model) -> tuple[dict[str, tuple], int, float]:
    """{name: (A', B')} with W + s * B' @ A' == W_res + s * B @ A (lora.update_factors),
    the common rank r' and alpha' = s * r' (so alpha' / r' = s). When some layer moved
    weight, a layer that did not gets zero blocks, so all layers share one rank."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    if len({(l.r, l.scaling) for l in layers.values()}) > 1:
        raise ValueError("exporting needs one rank and one alpha for all layers")
    with_residual = any(l.has_residual for l in layers.values())
    deltas = {}
    for name, layer in layers.items():
        B, A = update_factors(layer)
        if with_residual and not layer.has_residual:
            A, B = torch.cat([A, torch.zeros_like(A)], dim=0), torch.cat([B, torch.zeros_like(B)], dim=1)
        deltas[name] = (A, B)
    first = next(iter(layers.values()))
    rank = first.r * (2 if with_residual else 1)
    alpha = first.scaling * rank
    return deltas, rank, (int(alpha) if float(alpha).is_integer() else alpha)


def export_delta(model: torch.nn.Module, dir, config: dict) -> Path:
    """Write the plain delta in our adapter format (no A0, B0): load_adapter applies it to
    the original base weights and gives the adapted model. config as in save_adapter."""
    deltas, rank, alpha = _plain_deltas(model)
    tensors = {}
    for name, (A, B) in deltas.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A, B
    tensors = _checked_tensors(tensors, f"plain delta for {dir}")
    cfg = _adapter_config(model, tensors, {k: v for k, v in config.items() if k not in ("r", "alpha")}, rank, alpha)
    cfg["plain_delta"] = True
    return _write_adapter(Path(dir), ADAPTER_WEIGHTS, tensors, cfg)


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
    tensors = _checked_tensors(tensors, f"PEFT export for {dir}")
    dir = Path(dir)
    _write_safetensors(dir / PEFT_WEIGHTS, tensors)
    _write_json(dir / PEFT_CONFIG, config)
    return dir
