"""Saving, reloading and exporting adapters: each form must reproduce the adapted model."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import lora_layers
from loranull_mini.adapter_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, base_fingerprint, config_sha256,
                                      export_delta, export_peft, load_adapter, save_adapter)
from loranull_mini.files import tensors_sha256
from nullspace import inject_adapters
from tests.conftest import random_model
from tests.test_lora import ALL, calibration_covariances, logits, random_tokens, train_steps

METHODS = ["vanilla", "pissa", "milora", "corda", "null"]


def trained_adapter(method, freeze_A=False, targets=ALL, r=4, alpha=8):
    """random_model() with adapters of `method`, trained a few steps so A, B left their init.
    The init's name and the base fingerprint, taken before the init, go with the model."""
    model = random_model()
    covariances = calibration_covariances(model) if method in ("corda", "null") else None
    run = {"init": method, "base_fingerprint": base_fingerprint(model)}
    inject_adapters(model, targets, r=r, alpha=alpha, init=method, covariances=covariances, freeze_A=freeze_A)
    RUNS[id(model)] = run
    return train_steps(model)


RUNS = {}  # id(model) -> {"init", "base_fingerprint"} of trained_adapter's models


def save(model, path, config=None):
    return save_adapter(model, path, {**RUNS[id(model)], **(config or {})})


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reloads_into_a_fresh_base_model_with_identical_logits(method, tmp_path):
    model = trained_adapter(method, freeze_A=(method == "null"))
    save(model, tmp_path, {"base_model": "tiny-random", "lr": 1e-2})
    fresh = random_model()
    layers = load_adapter(fresh, tmp_path)
    idx = random_tokens()
    torch.testing.assert_close(logits(fresh, idx), logits(model, idx), atol=1e-6, rtol=0)
    original = lora_layers(model)
    assert layers.keys() == original.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.A, original[name].A) and torch.equal(layer.B, original[name].B)
        assert layer.has_residual == original[name].has_residual
        assert layer.A.requires_grad == (method != "null") and layer.B.requires_grad
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["init"] == method
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if not n.endswith((".A", ".B")))


def test_saved_config_records_method_rank_alpha_and_base_fingerprint(tmp_path):
    model = trained_adapter("pissa", targets=("q", "up"), r=2, alpha=6)
    save(model, tmp_path, {"base_model": "tiny-random", "lr": 1e-2})
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["init"] == "pissa" and cfg["method"] == "pissa" and cfg["targets"] == ["q", "up"]
    assert cfg["r"] == 2 and cfg["alpha"] == 6 and cfg["freeze_A"] is False
    assert cfg["base_model"] == "tiny-random" and cfg["lr"] == 1e-2
    assert cfg["base_fingerprint"] == base_fingerprint(random_model())
    assert cfg["layers"] == sorted(f"layers.{i}.{p}" for i in range(2)
                                   for p in ("attention.wq", "feed_forward.w_up"))
    assert len(load_file(str(tmp_path / ADAPTER_WEIGHTS))) == 4 * len(cfg["layers"])  # A, B, A0, B0
    assert {p.name for p in tmp_path.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}  # no temp files left


def test_method_label_defaults_to_the_init_and_names_loranull_v2(tmp_path):
    save(trained_adapter("null", freeze_A=True), tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["method"] == "null-v2"
    save(trained_adapter("null"), tmp_path, {"method": "my-label"})
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["method"] == "my-label"


def test_config_that_contradicts_the_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config disagrees.*'r': \\(16, 4\\)"):
        save(trained_adapter("vanilla"), tmp_path, {"r": 16})


def test_adapter_refuses_a_different_base_model(tmp_path):
    save(trained_adapter("pissa"), tmp_path, {"base_model": "tiny-random"})
    with pytest.raises(ValueError, match=r"different base model.*\(tiny-random\)"):
        load_adapter(random_model(seed=1), tmp_path)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(random_model().to(torch.bfloat16), tmp_path)


def test_loading_into_a_model_that_already_has_adapters_is_refused(tmp_path):
    model = trained_adapter("vanilla")
    save(model, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_exported_plain_delta_on_the_original_weights_gives_the_same_logits(method, tmp_path):
    model = trained_adapter(method)
    export_delta(model, tmp_path, RUNS[id(model)])
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    rank = 4 if method == "vanilla" else 8                      # [A; A0] doubles the rank
    assert cfg["plain_delta"] and cfg["r"] == rank and cfg["alpha"] / cfg["r"] == 8 / 4
    # applied by hand: W + s * B' @ A' for every layer of the ORIGINAL model
    tensors, fresh = load_file(str(tmp_path / ADAPTER_WEIGHTS)), random_model()
    assert not any(key.endswith(("A0", "B0")) for key in tensors)
    with torch.no_grad():
        for name in cfg["layers"]:
            A, B = tensors[f"{name}.A"], tensors[f"{name}.B"]
            assert A.shape[0] == rank
            fresh.get_submodule(name).weight += cfg["alpha"] / cfg["r"] * B @ A
    idx = random_tokens()
    torch.testing.assert_close(logits(fresh, idx), logits(model, idx), atol=1e-5, rtol=0)
    # and through load_adapter, as an adapter without residual
    fresh = random_model()
    layers = load_adapter(fresh, tmp_path)
    assert not any(layer.has_residual for layer in layers.values())
    torch.testing.assert_close(logits(fresh, idx), logits(model, idx), atol=1e-5, rtol=0)


def hf_llama(model, tmp_path):
    """transformers' LlamaForCausalLM holding the same weights as our `model`."""
    from transformers import LlamaForCausalLM

    from loranull_mini.checkpoint import save_hf
    save_hf(model, tmp_path / "hf")
    return LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()


def test_our_tiny_model_matches_transformers_llama(tmp_path):
    # The premise of the PEFT test below: without adapters the two stacks agree.
    idx = random_tokens()
    with torch.no_grad():
        theirs = hf_llama(random_model(), tmp_path)(idx).logits
    torch.testing.assert_close(theirs, logits(random_model(), idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vanilla", "pissa", "null"])
def test_peft_export_loads_into_peft_on_the_original_hf_weights_with_the_same_logits(method, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = trained_adapter(method, freeze_A=(method == "null"))
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(hf_llama(random_model(), tmp_path), tmp_path / "peft").eval()
    # every tensor we wrote is one PEFT expects, and PEFT expects no other
    ours = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS))
    assert set(ours) == set(get_peft_model_state_dict(peft_model))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] / cfg["r"] == 8 / 4   # PEFT's scale = ours
    idx = random_tokens()
    with torch.no_grad():
        theirs = peft_model(idx).logits
    torch.testing.assert_close(theirs, logits(model, idx), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- damaged adapters
def drop(*suffixes):
    return lambda tensors, cfg: ({k: v for k, v in tensors.items() if not k.endswith(suffixes)}, cfg)


def first_value(value):
    def damage(tensors, cfg):
        key = sorted(tensors)[0]
        t = tensors[key].clone()
        t.view(-1)[0] = value
        return {**tensors, key: t}, cfg
    return damage


def layer_only_in_the_tensors(tensors, cfg):
    return tensors, {**cfg, "layers": cfg["layers"][1:]}


def narrower_inputs(tensors, cfg):
    """The q projection's adapter made for 32 inputs instead of 64."""
    return {k: v[:, :32].contiguous() if k.startswith("layers.0.attention.wq.A") else v for k, v in tensors.items()}, cfg


def module_that_does_not_exist(tensors, cfg):
    copied = {k.replace("layers.0.", "layers.7.", 1): v.clone() for k, v in tensors.items() if k.startswith("layers.0.")}
    return {**tensors, **copied}, {**cfg, "layers": sorted({*cfg["layers"], *(k.rsplit(".", 1)[0] for k in copied)})}


DAMAGED_ADAPTERS = {  # name: (damage(tensors, config) -> (tensors, config), the error it gives)
    "no-A0-B0": (drop(".A0", ".B0"), r"does not hold the tensors its config needs \(init 'null', 14 layers\): "
                                     r"missing \['layers.0.attention.wk.A0'"),
    "extra-tensor": (lambda t, c: ({**t, "layers.0.attention.wq.C": torch.zeros(4, 4)}, c),
                     r"unexpected \['layers.0.attention.wq.C'\]"),
    "layer-only-in-the-tensors": (layer_only_in_the_tensors, r"13 layers\): unexpected \['layers.0.attention.wk.A'"),
    "nan": (first_value(float("nan")), r"layers.0.attention.wk.A holds NaN/Inf values"),
    "int32": (lambda t, c: ({**t, "layers.1.feed_forward.w_up.B": t["layers.1.feed_forward.w_up.B"].int()}, c),
              r"layers.1.feed_forward.w_up.B is torch.int32, expected torch.float32"),
    "missing-B": (drop("layers.1.attention.wq.B"), r"missing \['layers.1.attention.wq.B'\]"),
    "module-that-does-not-exist": (module_that_does_not_exist,
                                   r"names layer 'layers.7.attention.wk', which is not a linear layer of this model"),
    "config-is-a-list": (lambda t, c: (t, [c]), r"is not a loranull-mini adapter config \(not a JSON object\)"),
    "config-without-r": (lambda t, c: (t, {k: v for k, v in c.items() if k != "r"}),
                         r"is not a loranull-mini adapter config: missing \['r'\]"),
    "r-not-the-tensors-rank": (lambda t, c: (t, {**c, "r": 3}), r"has shape \(\d+, \d+\), not rank r=3"),
    "for-another-shape": (narrower_inputs, r"the adapter of layers.0.attention.wq is for a \(64, 32\) weight, "
                                           r"this model's is \(64, 64\)"),
}


@pytest.mark.parametrize("damage,message", DAMAGED_ADAPTERS.values(), ids=DAMAGED_ADAPTERS.keys())
def test_a_damaged_adapter_is_a_clear_error_and_leaves_the_model_unchanged(tmp_path, damage, message):
    save(trained_adapter("null"), tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    tensors, cfg = damage(load_file(str(tmp_path / ADAPTER_WEIGHTS)), cfg)
    if isinstance(cfg, dict):  # the sha256 fits the damaged tensors: only the check under test can notice
        cfg["tensors_sha256"] = tensors_sha256(tensors)
        cfg["config_sha256"] = config_sha256(cfg)  # the config's own sha256 too
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    model = random_model()
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)
    assert_same_weights(model, random_model())


def test_an_adapter_changed_after_saving_fails_its_sha256_and_leaves_the_model_unchanged(tmp_path):
    save(trained_adapter("null"), tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    tensors["layers.0.attention.wq.B"][0, 0] += 1e-3
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    model = random_model()
    with pytest.raises(ValueError, match="does not match the sha256 recorded in .*adapter_config.json: "
                                         "the file was changed or damaged after it was saved"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)
    assert_same_weights(model, random_model())


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_an_unreadable_or_missing_adapter_file_is_a_clear_error(tmp_path):
    model = trained_adapter("null")
    save(model, tmp_path / "ours")
    weights = tmp_path / "ours" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .*adapter.safetensors \(truncated or corrupted\?\)"):
        load_adapter(random_model(), tmp_path / "ours")
    export_peft(model, tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match=r"no adapter.safetensors in .*peft \(this looks like a PEFT export: "
                                                r"load it with peft\)"):
        load_adapter(random_model(), tmp_path / "peft")


def test_an_adapter_with_non_finite_weights_is_not_saved(tmp_path):
    model = trained_adapter("null")
    with torch.no_grad():
        lora_layers(model)["layers.1.feed_forward.w_up"].B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers.1.feed_forward.w_up.B holds NaN/Inf values; not saved"):
        save(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"layers.1.feed_forward.w_up.B holds NaN/Inf values; not saved"):
        export_delta(model, tmp_path / "delta", RUNS[id(model)])
    assert not list(tmp_path.iterdir())
