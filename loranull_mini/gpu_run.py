"""Everything the project needs a GPU for, in one command: python eval.py --suite gpu

On one CUDA GPU (bfloat16 autocast), within --budget-s seconds (default 660: a 12-minute slot):
1. shape7b: calibration + LoRA-Null init (train.py's block-by-block path, the fast basis that
   wide models use) on a LLaMA-2-7B-shaped model of random weights (32 blocks, dim 4096,
   FFN 11008, 32 heads), timed against PEFT's CorDA-KPM on a LlamaForCausalLM of the same
   shape and dtype (its own random weights), on the same calibration tokens;
2. bench: python -m loranull_mini.bench --device cuda, the bfloat16 rows against transformers + PEFT;
3. study: eval.py --suite real-long until the budget is spent. Every finished run's file lands
   in docs/results/real-long/runs, so the next call, on this machine or another, goes on
   where this one stopped (commit the files).
A part whose packages are missing (transformers, peft) is recorded as skipped, with why.
OUT/gpu.json (default docs/results/gpu) holds the environment and each part's numbers;
OUT/README.md renders them.

The asset cache (the SmolLM2 GGUF is 98 MB) is more than one device call carries (~60 MB):
    python -m loranull_mini.gpu_run --pack-cache gpu-carry       # here: parts of <= 48 MB + manifest
    (device) LORANULL_MINI_CACHE=.cache-gpu python -m loranull_mini.gpu_run --unpack-cache gpu-carry
    (device) LORANULL_MINI_CACHE=.cache-gpu python eval.py --suite gpu --budget-s 600
--unpack-cache verifies every part and the whole before it extracts, and may be given the parts
over two calls (it waits for all of them: nothing is extracted from half a cache).

--quick: the same plumbing on the CPU at toy size (tests/test_gpu_run.py).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import torch

PART_BYTES = 48 * 2 ** 20
SHAPE_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
SHAPE_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=172, vocab_size=256)
TINY_STUDY = dict(preset="real", methods=("lora", "null-v2"), seeds=(0, 1), steps=3, batch_size=4, warmup=1,
                  checkpoints=(1, 2, 3), neighbours=0, rank=4, alpha=8.0, calib_source="nq-open",
                  calib_samples=4, calib_len=32,
                  sizes={"wiki": 4, "wiki_tokens": 64, "nq": 4, "nq_em": 2, "mmlu": 4, "tqa": 4, "val": 6,
                         "pilot_val": 6, "test": 4, "test_acc": 2, "top_k": 16},
                  pilot=dict(seed=0, steps=2, lrs={"default": (1e-2, 2e-2, 4e-2, 8e-2)}, max_extensions=0))


# ----------------------------------------------------------------------------- the asset cache in parts
def pack_cache(cache: Path, dest: Path) -> dict:
    """The asset cache as one tar, cut into parts of <= PART_BYTES, and manifest.json (sha256 of each, and of all)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(cache, arcname=".")
    data = buf.getvalue()
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), PART_BYTES):
        name = f"cache.tar.part{i // PART_BYTES:02d}"
        (dest / name).write_bytes(data[i:i + PART_BYTES])
        parts.append({"name": name, "bytes": len(data[i:i + PART_BYTES]),
                      "sha256": hashlib.sha256(data[i:i + PART_BYTES]).hexdigest()})
    manifest = {"parts": parts, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack_cache(src: Path, cache: Path) -> str:
    """Extract the packed cache into `cache` once every part is there and verified; else say what is missing."""
    manifest = json.loads((src / "manifest.json").read_text())
    missing = [p["name"] for p in manifest["parts"] if not (src / p["name"]).is_file()]
    if missing:
        return f"waiting for {', '.join(missing)} (send them in the next call); nothing extracted"
    data = b""
    for p in manifest["parts"]:
        part = (src / p["name"]).read_bytes()
        if hashlib.sha256(part).hexdigest() != p["sha256"]:
            raise ValueError(f"{src / p['name']} does not match its sha256 in the manifest: send it again")
        data += part
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"the joined parts in {src} do not match the manifest's sha256")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(cache, filter="data")
    return f"extracted {manifest['bytes'] / 2 ** 20:.0f} MB into {cache}"


# ----------------------------------------------------------------------------- 1. the 7B-shaped init
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape7b(shape: dict, device, dtype, windows: int, length: int, rank: int = 16) -> dict:
    from loranull_mini import calibration, fastbasis
    from model import PROJECTIONS, ModelConfig, Transformer
    torch.manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (windows, length))
    result = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "calibration_tokens": windows * length,
              "rank": rank}
    with torch.device(device):
        ours = Transformer(ModelConfig(**shape, max_seq_len=length)).to(dtype)
    result["params"] = ours.num_params()
    batches = [(tokens[i:i + 4].to(device), None) for i in range(0, windows, 4)]
    _sync(device)
    t = time.time()
    calibration.inject_blockwise(ours, batches, tuple(PROJECTIONS), r=rank, alpha=2.0 * rank, init="null",
                                 dtype=torch.float32, keep_covariances=False, basis=fastbasis.smallest_eigenvectors)
    _sync(device)
    result["ours_s"] = time.time() - t
    if device.type == "cuda":
        result["ours_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        from peft import get_peft_model
        from peft.tuners.lora.corda import preprocess_corda
        from transformers import LlamaConfig, LlamaForCausalLM

        from loranull_mini.bench import peft_config
    except ImportError as e:
        result["theirs"] = f"skipped: {e}"
        return result
    config = LlamaConfig(hidden_size=shape["dim"], intermediate_size=shape["hidden_dim"],
                         num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                         num_key_value_heads=shape["n_kv_heads"], vocab_size=shape["vocab_size"],
                         max_position_embeddings=length)
    with torch.device(device):
        theirs = LlamaForCausalLM(config).to(dtype)
    ids = tokens.to(device)
    _sync(device)
    t = time.time()
    cfg = peft_config(rank, 2.0 * rank, "corda")
    preprocess_corda(theirs, cfg, run_model=lambda: [theirs(input_ids=w[None]) for w in ids])
    get_peft_model(theirs, cfg)
    _sync(device)
    result["theirs_s"] = time.time() - t
    if device.type == "cuda":
        result["theirs_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    result["ratio"] = result["ours_s"] / result["theirs_s"]
    return result


# ----------------------------------------------------------------------------- 3. the study
def study_part(name: str, measure, out: Path, device: str, until: float, tiny: bool) -> dict:
    import dataclasses

    from loranull_mini import study
    if tiny:
        measure = dataclasses.replace(measure, load_model_and_data=tiny_model_and_data)
    if tiny:
        study.SUITES[name] = TINY_STUDY
    t = time.time()
    try:
        summary = study.run(name, measure, out=str(out), device=device, until=until)
    finally:
        if tiny:
            study.SUITES.pop(name)
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").glob("*/*.json"))
    return {"suite": name, "out": str(out), "seconds": time.time() - t, "runs_done": len(runs),
            "runs_total": summary.get("runs_total"), "finished": summary.get("finished", False),
            "stopped_in": summary.get("stopped_in", "")}


def tiny_model_and_data(cfg, log=print):
    """SmolLM2's tokenizer and the real data with a toy-shaped random model (the plumbing test)."""
    from types import SimpleNamespace

    from loranull_mini import data as datasets
    from loranull_mini.checkpoint import load_model
    from model import ModelConfig, Transformer
    _, tok = load_model(None, require_tokenizer=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=512))
    rows = datasets.asdiv("train")[:32]
    windows = datasets.calibration_windows(tok, datasets.calibration_texts(cfg.calib_source), cfg.calib_samples,
                                           cfg.calib_len)
    train = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in rows]
    return model.eval(), tok, SimpleNamespace(train=train, heldout=[], calibration=windows, calibration_mask=None)


# ----------------------------------------------------------------------------- all of it
def run(measure, out: Path, budget_s: float, tiny: bool, device_name: str) -> dict:
    """Every part, in order, within budget_s; `measure` is eval.py's (suite.Measures)."""
    from loranull_mini.devices import pick_device
    from loranull_mini.files import write_json, write_text
    start = time.time()
    until = start + budget_s
    device_name = "cpu" if tiny else device_name
    device, _ = pick_device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "budget_s": budget_s, "tiny": tiny}
    parts = {}
    print(f"gpu_run on {env['device']}, budget {budget_s:.0f} s{' (tiny)' if tiny else ''}", flush=True)
    parts["shape7b"] = attempt(lambda: shape7b(SHAPE_TINY if tiny else SHAPE_7B, device, dtype,
                                               windows=4 if tiny else 8, length=32 if tiny else 256))
    if tiny:
        parts["bench"] = {"skipped": "--tiny (tests/test_bench.py runs the bench at tiny size)"}
    else:
        parts["bench"] = attempt(lambda: bench_part(device, out / "bench.json"))
    parts["study"] = attempt(lambda: study_part("real-long-tiny" if tiny else "real-long", measure,
                                                out / "real-long-tiny" if tiny else Path("docs/results/real-long"),
                                                device_name, until, tiny))
    result = {"environment": env, "parts": parts, "seconds": time.time() - start}
    write_json(out / "gpu.json", result)
    write_text(out / "README.md", render(result))
    print(render(result), flush=True)
    return result


def attempt(part) -> dict:
    t = time.time()
    try:
        value = part()
    except ImportError as e:
        return {"skipped": f"{type(e).__name__}: {e}", "seconds": time.time() - t}
    except Exception as e:      # one part failing must not lose the others' numbers
        return {"failed": f"{type(e).__name__}: {e}", "seconds": time.time() - t}
    return {**value, "seconds": time.time() - t}


def bench_part(device, json_path: Path) -> dict:
    """The bench on `device` (its full output in json_path); the table's columns of each row."""
    from loranull_mini import bench
    rows = bench.main(["--device", device.type, "--json", str(json_path)])["rows"]
    return {"rows": [{k: r[k] for k in ("name", "ours", "theirs", "ratio", "target", "met")} for r in rows]}


def render(result: dict) -> str:
    env, parts = result["environment"], result["parts"]
    lines = [f"# GPU run: {env['device']}, torch {env['torch']}, {env['date']}", "",
             f"`python eval.py --suite gpu{' --quick' if env['tiny'] else ''}`, budget {env['budget_s']:.0f} s, "
             f"{result['seconds']:.0f} s in all.", ""]
    s = parts["shape7b"]
    lines.append("## 7B-shaped calibration + LoRA-Null init against PEFT CorDA-KPM")
    if "ours_s" in s:
        lines += [f"{s['params'] / 1e9:.2f}B params ({s['dtype']}), {s['calibration_tokens']} calibration tokens, "
                  f"r={s['rank']}: ours {s['ours_s']:.1f} s"
                  + (f", PEFT CorDA {s['theirs_s']:.1f} s, ratio {s['ratio']:.3f}" if "theirs_s" in s
                     else f"; PEFT: {s.get('theirs')}"), ""]
    else:
        lines += [str(s.get("skipped") or s.get("failed")), ""]
    lines.append("## Bench, bfloat16 rows")
    b = parts["bench"]
    if "rows" in b:
        lines += ["| measurement | ours | theirs | ratio | met |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['ours']:.4g} | {r['theirs']:.4g} | {r['ratio']:.3f} | {r['met']} |"
                  for r in b["rows"]]
    else:
        lines.append(str(b.get("skipped") or b.get("failed")))
    lines += ["", "## The long study"]
    st = parts["study"]
    if "runs_done" in st:
        lines.append(f"{st['runs_done']} of {st['runs_total'] or 'the'} runs in {st['out']} "
                     + (f"(stopped in the {st['stopped_in']}) " if st["stopped_in"] else "")
                     + f"({'finished' if st['finished'] else 'to be resumed: run the script again'}), {st['seconds']:.0f} s")
    else:
        lines.append(str(st.get("skipped") or st.get("failed")))
    return "\n".join(lines) + "\n"


def main(argv=None):
    """--pack-cache / --unpack-cache; the run itself: python eval.py --suite gpu [--quick]."""
    p = argparse.ArgumentParser(description="the asset cache in parts for a device machine")
    p.add_argument("--pack-cache", type=Path, metavar="DIR", help="write the asset cache as parts to DIR")
    p.add_argument("--unpack-cache", type=Path, metavar="DIR", help="extract the packed parts in DIR")
    args = p.parse_args(argv)
    from loranull_mini import assets
    if args.pack_cache:
        m = pack_cache(assets.cache_dir(), args.pack_cache)
        print(f"wrote {len(m['parts'])} parts ({m['bytes'] / 2 ** 20:.0f} MB) to {args.pack_cache}")
    if args.unpack_cache:
        print(unpack_cache(args.unpack_cache, assets.cache_dir()))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
