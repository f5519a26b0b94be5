"""The project's code against the reference vectors in tests/reference/ (made by make_reference.py).

Every case of the manifest is recomputed here with model.py, lora.py, nullspace.py and the loss of
train.py and compared within the manifest's tolerances; the files themselves must regenerate bit for
bit and stay small.
"""
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lora
import nullspace as ns
import train
from loranull_mini.checkpoint import permute_interleaved_to_half
from loranull_mini.data import Example, collate
from model import (PROJECTIONS, Attention, FeedForward, KVCache, ModelConfig, RMSNorm, Transformer, apply_rotary,
                   rotary_cos_sin)
from tests import numpy_port as npp

REFERENCE = Path(__file__).resolve().parent / "reference"
MANIFEST = npp.load_manifest(REFERENCE)
CASES = {e["name"]: e for e in MANIFEST["cases"]}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_reference", REFERENCE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def t(a):
    return torch.from_numpy(np.array(a))


def tiny_model(entry, d) -> Transformer:
    model = Transformer(ModelConfig(**entry["params"]["config"]))
    names = MANIFEST["shared_files"][entry["also_load"][0]]["tensors"]
    model.load_state_dict({**{k: t(d[k]) for k in names}, "output.weight": t(d["tok_embeddings.weight"])})
    return model.eval()


def padding_rule(pad_mask):
    """The model's rotary positions and attention mask for a batch, without a cache."""
    return Transformer._positions_and_mask(None, pad_mask, pad_mask, None)


# ----------------------------------------------------------------------------- one function per case

@torch.no_grad()
def run_rmsnorm(e, d):
    norm = RMSNorm(d["x"].shape[-1], e["params"]["eps"])
    norm.weight.copy_(t(d["weight"]))
    return {"y": norm(t(d["x"]))}


def run_rotary(e, d):
    cos, sin = rotary_cos_sin(t(d["positions"]), e["params"]["head_dim"], e["params"]["theta"])
    return {"cos": cos, "sin": sin, "q_rot": apply_rotary(t(d["q"]), cos, sin), "k_rot": apply_rotary(t(d["k"]), cos, sin)}


@torch.no_grad()
def run_attention_gqa(e, d):
    p = e["params"]
    cfg = ModelConfig(dim=p["dim"], n_layers=1, n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], vocab_size=2,
                      hidden_dim=2, rope_theta=p["theta"])
    positions, mask = padding_rule(t(d["pad_mask"]))
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    att = Attention(cfg)
    for name in ("wq", "wk", "wv", "wo"):
        getattr(att, name).weight.copy_(t(d[name]))
    ys = []
    for repeat in (False, True):  # SDPA's own grouping and the repeated heads must agree
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("model.repeat_kv_heads", lambda mask, device: repeat)
            ys.append(att(t(d["x"]), cos, sin, mask))
    torch.testing.assert_close(ys[0], ys[1])
    return {"positions": positions, "mask": mask, "y": ys[0]}


@torch.no_grad()
def run_swiglu(e, d):
    p = e["params"]
    ff = FeedForward(ModelConfig(dim=p["dim"], n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=2,
                                 hidden_dim=p["hidden_dim"]))
    for name in ("w_gate", "w_up", "w_down"):
        getattr(ff, name).weight.copy_(t(d[name]))
    return {"y": ff(t(d["x"]))}


@torch.no_grad()
def run_tiny_model(e, d):
    positions, _ = padding_rule(t(d["pad_mask"]))
    logits, _ = tiny_model(e, d)(t(d["idx"]), pad_mask=t(d["pad_mask"]))
    return {"positions": positions, "logits": logits}


@torch.no_grad()
def run_kv_cache_decode(e, d):
    model = tiny_model(e, d)
    cache = KVCache(model.config, d["idx"].shape[0], e["params"]["cache_slots"], "cpu", torch.float32)
    parts = [model(t(d["idx"][:, a:b]), pad_mask=t(d["pad_mask"][:, a:b]), cache=cache)[0]
             for a, b in e["params"]["chunks"]]
    return {"logits_cached": torch.cat(parts, 1), "next_pos": cache.next_pos}


def run_qk_permutation(e, d):
    p = e["params"]
    rows = torch.arange(p["n_heads"] * p["head_dim"], dtype=torch.float64)[:, None]
    return {"wq_half": permute_interleaved_to_half(t(d["wq_interleaved"]), p["n_heads"]),
            "wk_half": permute_interleaved_to_half(t(d["wk_interleaved"]), p["n_kv_heads"]),
            "rows_half_from_interleaved": permute_interleaved_to_half(rows, p["n_heads"]).flatten().long()}


def run_covariance_hook(e, d):
    model = load_generator().FixedActivations([d["x1"], d["x2"]])
    batches = [(torch.tensor([0]), t(d["pad_mask1"])), (torch.tensor([1]), t(d["pad_mask2"]))]
    C = ns.collect_covariances(model, batches, targets=("q",))
    return {"C": C[e["params"]["layer"]], "n_tokens": np.int64(d["pad_mask1"].sum() + d["pad_mask2"].sum())}


def run_covariance_tiny_model(e, d):
    batches = [(t(d["idx1"]), t(d["pad_mask1"])), (t(d["idx2"]), t(d["pad_mask2"]))]
    C = ns.collect_covariances(tiny_model(e, d), batches)
    return {f"C.{name}": value for name, value in C.items()}


def projector(A):
    _, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    basis = Vh[S > S.max() * max(A.shape) * torch.finfo(torch.float64).eps]
    return basis.T @ basis


def run_inits(e, d):
    W, C = t(d["W"]), t(d["C"])
    r, alpha = e["params"]["r"], e["params"]["alpha"]
    s = alpha / r
    energy = ns.output_energy(W, C)
    out = {"eigvals_C": torch.linalg.eigvalsh(C), "sv_W": torch.linalg.svdvals(W), "output_energy": energy}
    for init in e["params"]["inits"]:
        if init == "vanilla":  # the project draws A itself: check its draw's form, then use the stored A
            A, B, W_res = ns.INITS["vanilla"](W, C, r, alpha, generator=torch.Generator().manual_seed(0))
            assert torch.equal(B, torch.zeros_like(B)) and torch.equal(W_res, W)
            assert A.shape == (r, W.shape[1]) and A.abs().max() <= 1 / math.sqrt(W.shape[1])
            A = t(d["vanilla.A"])
        else:
            A, B, W_res = ns.INITS[init](W, C, r, alpha)
        A, B = A.double(), B.double()
        out.update({f"{init}.sBA": s * B @ A, f"{init}.W_res": W_res, f"{init}.P_A": projector(A),
                    f"{init}.sv_A": torch.linalg.svdvals(A), f"{init}.sv_B": torch.linalg.svdvals(B),
                    f"{init}.captured_energy": ns.captured_energy(A, C),
                    f"{init}.disturbance": ns.knowledge_disturbance(s * B, A, C, energy)})
        if init == "corda":
            C_damped, damp = ns.damped_covariance(C)
            out.update({"corda.damp": damp, "corda.C_damped": C_damped, "corda.sv_WC": torch.linalg.svdvals(W @ C_damped)})
    return out


run_inits_degenerate = run_inits


def run_diagnostics(e, d):
    W, C = t(d["W"]), t(d["C"])
    energy = ns.output_energy(W, C)
    out = {"output_energy": energy, "disturbance": ns.knowledge_disturbance(t(d["F"]), t(d["G"]), C, energy),
           "captured_energy_full": ns.captured_energy(t(d["A_full"]), C),
           "captured_energy_deficient": ns.captured_energy(t(d["A_deficient"]), C),
           "sv_weight": ns.weight_singular_values(W), "sv_activation": ns.activation_singular_values(C)}
    for name, sv in (("weight", out["sv_weight"]), ("activation", out["sv_activation"]),
                     ("tie", t(d["sv_tie"])), ("zeros", t(d["sv_zeros"]))):
        er = ns.effective_rank(sv)
        out.update({f"erank_{name}": er["erank"], f"n90_{name}": np.int64(er["n90"]), f"n99_{name}": np.int64(er["n99"])})
    return out


@torch.no_grad()
def run_lora_linear(e, d):
    p = e["params"]
    m, n = d["W_res"].shape
    layer = lora.LoRALinear(nn.Linear(n, m, bias=False), r=p["r"], alpha=p["alpha"])
    layer.base.weight.copy_(t(d["W_res"]))
    layer.A.copy_(t(d["A"]))
    layer.B.copy_(t(d["B"]))
    return {"y": layer(t(d["x"]))}


def run_lora_train_step(e, d):
    p = e["params"]
    model = tiny_model(e, d)
    layers = {}
    for name in lora.target_module_names(model, tuple(PROJECTIONS)):
        layer = layers[name] = lora.wrap_linear(model, name, p["r"], p["alpha"])
        with torch.no_grad():
            layer.base.weight.copy_(t(d[f"{name}.W_res"]))
            layer.A.copy_(t(d[f"{name}.A"]))
            layer.B.copy_(t(d[f"{name}.B"]))
    lora.mark_only_lora_trainable(model)
    model.train()
    examples = [Example([int(i) for i in row if i >= 0], int(n)) for row, n in zip(d["example_ids"], d["n_prompt"])]
    batch = collate(examples, pad_id=0)
    idx, targets, loss_mask, pad = (batch[k] for k in ("idx", "targets", "loss_mask", "pad_mask"))
    total = train.answer_nll_sum(model, batch)                             # the training step's loss
    count = ((loss_mask > 0) & (targets != -100)).sum()
    loss = total / count
    loss.backward()
    with torch.no_grad():
        full, mean = model(idx, targets, loss_mask, pad_mask=pad)         # the evaluation path: the same loss
    torch.testing.assert_close(mean, loss.detach())
    out = {"loss": loss, "n_scored": count.long(), "logits": full, **batch}
    for name, layer in layers.items():
        out[f"grad.{name}.A"], out[f"grad.{name}.B"] = layer.A.grad, layer.B.grad
    return out


RUN = {name[4:]: fn for name, fn in globals().items() if name.startswith("run_")}


# ----------------------------------------------------------------------------- the tests

def test_every_case_is_checked():
    assert set(RUN) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_project_matches_reference(name):
    entry = CASES[name]
    tensors = npp.load_case(entry, REFERENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no case may lean on a warning path (e.g. a rank-deficient covariance)
        out = RUN[name](entry, tensors)
    assert set(out) == set(entry["outputs"])
    for key, value in out.items():
        value = value.detach().numpy() if isinstance(value, torch.Tensor) else value
        npp.check(entry, tensors, key, value)


def test_manifest_describes_the_files():
    """Every tensor the manifest names is in its file with that shape and dtype, and nothing else is."""
    for entry in MANIFEST["cases"]:
        tensors = npp.load_case({**entry, "also_load": []}, REFERENCE)
        described = {**entry["inputs"], **entry["outputs"]}
        assert set(tensors) == set(described), entry["name"]
        for name, spec in described.items():
            assert list(tensors[name].shape) == spec["shape"] and str(tensors[name].dtype) == spec["dtype"], name
    for file, spec in MANIFEST["shared_files"].items():
        tensors = npp.load_case({"file": file, "also_load": []}, REFERENCE)
        assert {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()} == \
               {k: [s["shape"], s["dtype"]] for k, s in spec["tensors"].items()}


def test_reference_is_small():
    files = [p for p in REFERENCE.iterdir() if p.suffix in (".safetensors", ".json")]
    assert sum(p.stat().st_size for p in files) < 1_000_000


def test_regenerating_gives_the_same_bytes_or_agrees_within_tolerance(tmp_path):
    """On the machine that made them, the files come back bit for bit. Another CPU's BLAS/LAPACK may
    round the last bits differently (AVX2 against AVX-512): then every tensor must still agree
    (outputs within the manifest's tolerances, inputs to 1e-12), and a warning names the files that
    were not bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_generator().main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    stored = sorted(p.name for p in REFERENCE.iterdir() if p.suffix in (".safetensors", ".json"))
    assert written == stored
    differ = [name for name in written if (tmp_path / name).read_bytes() != (REFERENCE / name).read_bytes()]
    if not differ:
        return
    fresh = npp.load_manifest(tmp_path)
    assert same_json(fresh, MANIFEST), "manifest.json changed"
    specs = {e["file"]: e for e in MANIFEST["cases"]}
    for name in (n for n in differ if n.endswith(".safetensors")):
        old, new = npp.load_case({"file": name, "also_load": []}), npp.load_case({"file": name, "also_load": []}, tmp_path)
        assert set(old) == set(new), name
        outputs = specs[name]["outputs"] if name in specs else {}
        for key in old:
            if old[key].dtype.kind in "biu":
                np.testing.assert_array_equal(new[key], old[key], err_msg=f"{name}: {key}")
            elif key in outputs:
                npp.check(specs[name], old, key, new[key])
            else:
                np.testing.assert_allclose(new[key], old[key], rtol=1e-12, atol=1e-12 * np.abs(old[key]).max(),
                                           err_msg=f"{name}: {key}")
    warnings.warn(f"regenerated within tolerance but not bit for bit here: {', '.join(differ)}")


def same_json(a, b) -> bool:
    """Equal, numbers to a relative 1e-6 (data-dependent tolerances may round differently elsewhere)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b and type(a) is type(b)
