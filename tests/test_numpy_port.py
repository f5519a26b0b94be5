"""The NumPy port (tests/numpy_port.py) against every reference case, within the manifest's tolerances:
the reference vectors are enough to port the project without torch."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import numpy_port as npp

MANIFEST = npp.load_manifest()
CASES = {e["name"]: e for e in MANIFEST["cases"]}
f64 = np.float64


def config(entry):
    return entry["params"]["config"]


def run_rmsnorm(e, d):
    return {"y": npp.rms_norm(d["x"].astype(f64), d["weight"].astype(f64), e["params"]["eps"])}


def run_rotary(e, d):
    cos, sin = npp.rotary_cos_sin(d["positions"], e["params"]["head_dim"], e["params"]["theta"])
    return {"cos": cos, "sin": sin, "q_rot": npp.apply_rotary(d["q"].astype(f64), cos, sin),
            "k_rot": npp.apply_rotary(d["k"].astype(f64), cos, sin)}


def run_attention_gqa(e, d):
    p = e["params"]
    positions, mask = npp.positions_and_mask(d["pad_mask"])
    cos, sin = npp.rotary_cos_sin(positions, p["head_dim"], p["theta"])
    weights = {n: d[n].astype(f64) for n in ("wq", "wk", "wv", "wo")}
    y = npp.attention_block(d["x"].astype(f64), weights, cos, sin, mask, p["n_heads"], p["n_kv_heads"])
    return {"positions": positions, "mask": mask, "y": y}


def run_swiglu(e, d):
    return {"y": npp.swiglu(d["x"].astype(f64), *(d[n].astype(f64) for n in ("w_gate", "w_up", "w_down")))}


def run_tiny_model(e, d):
    positions, _ = npp.positions_and_mask(d["pad_mask"])
    return {"positions": positions, "logits": npp.TinyLlama(d, config(e))(d["idx"], d["pad_mask"])}


def run_kv_cache_decode(e, d):
    model = npp.TinyLlama(d, config(e))
    cache = model.new_cache(d["idx"].shape[0], e["params"]["cache_slots"])
    parts = [model(d["idx"][:, a:b], d["pad_mask"][:, a:b], cache) for a, b in e["params"]["chunks"]]
    logits = np.concatenate(parts, axis=1)
    full = npp.TinyLlama(d, config(e))(d["idx"], d["pad_mask"])
    np.testing.assert_allclose(logits, full, atol=1e-9)  # the cache changes nothing, in float64
    return {"logits_cached": logits, "next_pos": cache.next_pos}


def run_qk_permutation(e, d):
    p = e["params"]
    rows = npp.permute_interleaved_to_half(np.arange(p["n_heads"] * p["head_dim"])[:, None], p["n_heads"])
    return {"wq_half": npp.permute_interleaved_to_half(d["wq_interleaved"], p["n_heads"]),
            "wk_half": npp.permute_interleaved_to_half(d["wk_interleaved"], p["n_kv_heads"]),
            "rows_half_from_interleaved": rows.ravel().astype(np.int64)}


def run_covariance_hook(e, d):
    C, N = npp.covariance([(d["x1"], d["pad_mask1"]), (d["x2"], d["pad_mask2"])])
    return {"C": C, "n_tokens": np.int64(N)}


def run_covariance_tiny_model(e, d):
    C = npp.model_covariances(d, config(e), [(d["idx1"], d["pad_mask1"]), (d["idx2"], d["pad_mask2"])])
    return {f"C.{name}": value for name, value in C.items()}


def run_inits(e, d):
    W, C = d["W"], d["C"]
    r, alpha = e["params"]["r"], e["params"]["alpha"]
    s = alpha / r
    energy = npp.output_energy(W, C)
    out = {"eigvals_C": np.linalg.eigvalsh(C), "sv_W": np.linalg.svd(W, compute_uv=False), "output_energy": energy}
    for init in e["params"]["inits"]:
        A, B, W_res = npp.vanilla_init(W, d["vanilla.A"]) if init == "vanilla" else npp.INITS[init](W, C, r, alpha)
        out.update({f"{init}.sBA": s * B @ A, f"{init}.W_res": W_res, f"{init}.P_A": npp.projector(A),
                    f"{init}.sv_A": np.linalg.svd(A, compute_uv=False), f"{init}.sv_B": np.linalg.svd(B, compute_uv=False),
                    f"{init}.captured_energy": npp.captured_energy(A, C),
                    f"{init}.disturbance": npp.knowledge_disturbance(s * B, A, C, energy)})
        if init == "corda":
            Cd, damp = npp.damped_covariance(C)
            out.update({"corda.damp": damp, "corda.C_damped": Cd,
                        "corda.sv_WC": np.linalg.svd(W @ Cd, compute_uv=False)})
    return out


run_inits_degenerate = run_inits


def run_diagnostics(e, d):
    W, C = d["W"], d["C"]
    energy = npp.output_energy(W, C)
    out = {"output_energy": energy, "disturbance": npp.knowledge_disturbance(d["F"], d["G"], C, energy),
           "captured_energy_full": npp.captured_energy(d["A_full"], C),
           "captured_energy_deficient": npp.captured_energy(d["A_deficient"], C),
           "sv_weight": np.linalg.svd(W, compute_uv=False), "sv_activation": npp.activation_singular_values(C)}
    for name, sv in (("weight", out["sv_weight"]), ("activation", out["sv_activation"]),
                     ("tie", d["sv_tie"]), ("zeros", d["sv_zeros"])):
        er = npp.effective_rank(sv)
        out.update({f"erank_{name}": er["erank"], f"n90_{name}": np.int64(er["n90"]), f"n99_{name}": np.int64(er["n99"])})
    return out


def run_lora_linear(e, d):
    p = e["params"]
    layer = npp.Linear(d["W_res"].astype(f64), d["A"].astype(f64), d["B"].astype(f64), p["alpha"] / p["r"])
    return {"y": layer(d["x"].astype(f64))}


def run_lora_train_step(e, d):
    p = e["params"]
    names = sorted({k.rsplit(".", 1)[0] for k in d if k.endswith(".W_res")})
    adapters = {n: (d[f"{n}.A"], d[f"{n}.B"], d[f"{n}.W_res"]) for n in names}
    batch = npp.collate([(row[row >= 0], n) for row, n in zip(d["example_ids"], d["n_prompt"])])
    loss, n, logits, grads = npp.train_step(d, config(e), adapters, p["alpha"] / p["r"], *batch)
    out = {"loss": loss, "n_scored": np.int64(n), "logits": logits,
           **dict(zip(("idx", "targets", "loss_mask", "pad_mask"), batch))}
    for name, (dA, dB) in grads.items():
        out[f"grad.{name}.A"], out[f"grad.{name}.B"] = dA, dB
    return out


RUN = {name[4:]: fn for name, fn in globals().items() if name.startswith("run_")}


def test_every_case_has_a_port_check():
    assert set(RUN) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_port_matches_reference(name):
    entry = CASES[name]
    tensors = npp.load_case(entry)
    out = RUN[name](entry, tensors)
    assert set(out) == set(entry["outputs"]), f"{name}: port outputs differ from the manifest's"
    for key, value in out.items():
        npp.check(entry, tensors, key, value)


def test_port_imports_no_torch():
    """numpy_port.py names torch nowhere in its imports, and importing it loads no torch."""
    path = Path(npp.__file__)
    tree = ast.parse(path.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "torch"]
    code = (f"import sys; sys.path.insert(0, {str(path.parent)!r}); import numpy_port; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
