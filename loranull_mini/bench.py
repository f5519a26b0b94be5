"""Side by side with Hugging Face transformers + PEFT: python -m loranull_mini.bench [--quick]

One invocation runs both stacks on the same weights (SmolLM2-135M, exported to the HF
layout and loaded into transformers' LlamaForCausalLM), the same LoRA config (r, alpha,
all seven projections), the same calibration tokens and the same batches. Every
measurement alternates the stacks (ours, theirs, ours, theirs, ...), is repeated
--repeats times, and is reported as medians and the ratio ours / theirs:

1. init time: LoRA-Null (covariances, the null basis, factors, block by block, as train.py;
   the eigh basis of the default and the fast one of --null-basis fast) against PEFT's CorDA
   knowledge-preserved init, its nearest peer (also activation covariances), on the
   calibration windows, and with the fast basis on --calib-scale times as many (that row
   timed once: PEFT's CorDA alone takes minutes there);
   our PiSSA against PEFT's, with the exact and the randomized SVD;
2. training: tokens/s (real tokens, padding excluded) of forward + backward + AdamW on
   train.py's supervised batches (ASDiv questions in the chat template, loss on the answer
   tokens only, padded to the batch's longest row), and the peak memory, each stack in a
   child process of its own so the two peaks do not mix;
3. generation: tokens/s of greedy batched decoding with the KV cache against HF generate;
4. calibration overhead: collecting the covariances against a plain forward of the same
   tokens;
5. padding-free training (ours only): the same batches packed into rows of --train-len
   (several examples a row, a block-diagonal causal mask) against the padded layout, and
   the share of positions that are padding in each;
6. distance to the limit: training FLOP/s (counted by `training_flops`) against the dense
   matmul FLOP/s measured in the same processes.

--quick (for CI) measures every row once, on less calibration, fewer steps and tokens.

CPU runs float32 with torch's default threads (set OMP_NUM_THREADS or
torch.set_num_threads to change them; the table's header says how many ran). On CUDA
(--device cuda) both stacks train, calibrate and generate under bfloat16 autocast with
SDPA. transformers and peft are benchmark/test-only dependencies (pip install -e .[test]).
Timing on a shared machine is noisy: compare ratios, not absolute numbers, and set
OMP_WAIT_POLICY=PASSIVE (loranull_mini/__init__.py does, before torch loads).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loranull_mini.data import answer_positions
from model import PROJECTIONS, ModelConfig

# our short target names -> the module names of transformers' LLaMA
HF_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ALL_TARGETS = tuple(PROJECTIONS)


# ----------------------------------------------------------------------------- FLOPs
def training_flops(config: ModelConfig, r: int, targets=ALL_TARGETS, batch: int = 1, seq_len: int = 1,
                   freeze_A: bool = False, output_tokens: int | None = None) -> int:
    """Matmul FLOPs of one LoRA training step (forward + backward) on batch x seq_len tokens,
    of which output_tokens (default all) are projected to the vocabulary.

    Convention (the one behind "6 x params x tokens", made honest for a frozen base):
    - a matmul (M, K) @ (K, N) costs 2 M K N; elementwise work (norms, rotary, softmax,
      SiLU, residual adds, the loss, the optimizer) is not counted;
    - a frozen linear y = x W^T (W m x n) costs 2 m n per token forward, and in the
      backward 2 m n for the input gradient only when its input needs a gradient, never a
      weight gradient (frozen). So a frozen base costs ~4 x params x tokens, not 6.
      The input of a block needs a gradient only once some adapter lies before it: the
      first block's q, k, v read the frozen embedding, so their input gradient is skipped
      (autograd skips it too);
    - a LoRA adapter (A r x n, B m x r) costs 2 r (n + m) forward; backward 2 m r for the
      gradient of B, 2 m r for the gradient of h = x A^T (needed by A or by x), 2 r n for
      the gradient of A (unless frozen), 2 r n for the input gradient (when needed);
    - attention, causal: query t attends to t + 1 keys, so scores Q K^T and context P V
      cost 2 hd (t + 1) per query head each, T (T + 1) / 2 pairs per sequence; backward:
      dP = dO V^T and dV = P^T dO, dS K for dQ and dS^T Q for dK, each as costly as its
      forward product (taken when that input needs a gradient). Recomputation inside
      fused kernels is not counted: these are model FLOPs, not hardware FLOPs;
    - the output projection (tied to the embedding, frozen): 2 V D per projected token forward
      and the same backward for the gradient of the final hidden state (a supervised batch
      whose loss reads only the answer tokens needs them only there: output_tokens).
    """
    D, hd, H, Hkv, F, V = (config.dim, config.head_dim, config.n_heads, config.n_kv_heads,
                           config.hidden_dim, config.vocab_size)
    shapes = {"q": (H * hd, D), "k": (Hkv * hd, D), "v": (Hkv * hd, D), "o": (D, H * hd),
              "gate": (F, D), "up": (F, D), "down": (D, F)}  # (out m, in n)
    tokens = batch * seq_len
    pairs = batch * seq_len * (seq_len + 1) // 2  # (query, key) pairs of causal attention
    total = 0

    def linear(name, input_needs_grad):
        """FLOPs of one projection, forward + backward; returns whether its output needs a gradient."""
        nonlocal total
        m, n = shapes[name]
        total += 2 * m * n * tokens * (2 if input_needs_grad else 1)
        if name not in targets:
            return input_needs_grad
        total += 2 * r * (n + m) * tokens                          # forward: x A^T, h B^T
        needs_dh = not freeze_A or input_needs_grad
        total += 2 * m * r * tokens * (1 + needs_dh)               # dB = dY^T h, dh = dY B
        total += 2 * r * n * tokens * ((not freeze_A) + input_needs_grad)  # dA = dh^T x, dx = dh A
        return True

    needs_grad = False  # the residual stream: the embedding is frozen
    for _ in range(config.n_layers):
        q, k, v = (linear(p, needs_grad) for p in ("q", "k", "v"))
        total += 2 * 2 * H * hd * pairs                             # Q K^T and P V
        total += 2 * H * hd * pairs * ((q or k) + v + q + k)        # dP, dV, dQ, dK
        needs_grad = linear("o", q or k or v) or needs_grad
        gate, up = linear("gate", needs_grad), linear("up", needs_grad)
        needs_grad = linear("down", gate or up) or needs_grad
    projected = tokens if output_tokens is None else output_tokens
    total += 2 * V * D * projected * (2 if needs_grad else 1)       # output projection
    return total


def matmul_flops_per_s(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Dense (n, n) @ (n, n) FLOP/s, the best of `repeats` timings of a few products."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, first-touch of the output
    best = float("inf")
    for _ in range(repeats):
        start = now(device)
        for _ in range(4):
            a @ b
        best = min(best, (now(device) - start) / 4)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    device: str = field(default="cpu", metadata={"help": "cpu (float32) or cuda (bfloat16 autocast)"})
    model: str = field(default="", metadata={"help": "checkpoint (default: SmolLM2-135M-Instruct GGUF)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r, all seven projections"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha"})
    repeats: int = field(default=3, metadata={"help": "repetitions of every measurement (medians reported)"})
    calib_samples: int = field(default=8, metadata={"help": "calibration windows (NQ-open questions)"})
    calib_len: int = field(default=256, metadata={"help": "tokens per calibration window"})
    calib_batch: int = field(default=4, metadata={"help": "windows per calibration forward (ours; PEFT CorDA takes 1)"})
    calib_scale: int = field(default=4, metadata={"help": "the second init row calibrates on this many times "
                                                          "the calibration windows"})
    train_batch: int = field(default=8, metadata={"help": "examples per training step (train.py's --batch-size)"})
    train_len: int = field(default=256, metadata={"help": "longest training sequence (train.py's --max-len)"})
    train_steps: int = field(default=3, metadata={"help": "timed training steps per repetition"})
    gen_batch: int = field(default=4, metadata={"help": "prompts decoded together"})
    gen_tokens: int = field(default=32, metadata={"help": "new tokens per prompt (greedy)"})
    matmul_size: int = field(default=0, metadata={"help": "n of the n x n matmul for the peak FLOP/s "
                                                          "(0: 2048 on CPU, 8192 on CUDA)"})
    only: str = field(default="", metadata={"help": "comma-separated subset of "
                                                    "init,pissa,train,pack,generate,calibrate (default: all)"})
    json: str = field(default="", metadata={"help": "also write the results to this JSON file"})
    quick: bool = field(default=False, metadata={"help": "a short run for CI, every row still measured: "
                                                         + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                     for k, v in {"repeats": 1, "calib_samples": 4,
                                                                                  "calib_len": 128, "train_steps": 1,
                                                                                  "gen_tokens": 8,
                                                                                  "matmul_size": 1024}.items())
                                                         + " unless given"})


QUICK = {"repeats": 1, "calib_samples": 4, "calib_len": 128, "train_steps": 1, "gen_tokens": 8, "matmul_size": 1024}
GROUPS = ("init", "pissa", "train", "pack", "generate", "calibrate")


def parse_args(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[f.type]
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {f.default!r})")
    given = vars(parser.parse_args(argv))
    cfg = BenchConfig(**{**(QUICK if given.get("quick") else {}), **given})
    unknown = set(filter(None, cfg.only.split(","))) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {GROUPS}")
    if cfg.repeats < 1 or cfg.train_steps < 1 or cfg.calib_scale < 1:
        parser.error("--repeats, --train-steps and --calib-scale must be at least 1")
    return cfg


# ----------------------------------------------------------------------------- timing
def now(device: torch.device) -> float:
    """Wall-clock seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(device, fn, prepare=None) -> float:
    """Seconds that fn(prepared) takes; prepare() (untimed) builds its argument, e.g. a fresh copy."""
    argument = prepare() if prepare is not None else None
    gc.collect()
    start = now(device)
    fn(argument) if prepare is not None else fn()
    seconds = now(device) - start
    del argument
    return seconds


def alternate(repeats: int, ours, theirs) -> tuple[list, list]:
    """Run ours(), theirs(), ours(), theirs(), ... `repeats` times each: their results."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(theirs())
    return a, b


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# ----------------------------------------------------------------------------- the two stacks
def peft_config(rank: int, alpha: float, init="vanilla"):
    """PEFT's LoraConfig for our settings: all seven projections, no dropout, the given init."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    kwargs = {"corda": dict(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm")),
              "pissa": dict(init_lora_weights="pissa"),
              "pissa_niter_4": dict(init_lora_weights="pissa_niter_4"),
              "vanilla": dict(init_lora_weights=True)}[init]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=[HF_PROJECTIONS[t] for t in ALL_TARGETS], **kwargs)


def load_hf(hf_dir, device):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


@dataclass
class Stacks:
    """Both models with the same weights, and the tokens every measurement shares."""
    ours: torch.nn.Module                 # our Transformer
    theirs: torch.nn.Module               # transformers' LlamaForCausalLM
    hf_dir: Path                          # the exported weights both were loaded from
    calib: torch.Tensor                   # (calib_samples, calib_len) calibration windows
    calib_large: torch.Tensor             # (calib_scale * calib_samples, calib_len), the same text continued
    train: list                           # supervised batches: data.collate dicts (idx, targets, loss_mask, pad_mask)
    prompts: list                         # gen_batch prompts (token id lists) of different lengths
    parity: float                         # max |logits ours - theirs| on one calibration window


def training_batches(examples: list, cfg: BenchConfig, pad_id: int) -> list:
    """train.py's batches: examples in its seeded order (seed 0), cfg.train_batch per step, each
    padded to its longest row; one for the warm-up and one for every timed step."""
    from loranull_mini import data
    n = 1 + cfg.repeats * cfg.train_steps
    return [data.collate([examples[j] for j in data.batch_order(len(examples), cfg.train_batch, step, 0)],
                         pad_id, cfg.train_len) for step in range(n)]


def token_sets(cfg: BenchConfig, tokenizer, vocab_size: int):
    """Calibration windows (NQ-open questions; the first calib_samples of the larger set),
    supervised training batches (ASDiv train questions in the chat template, loss on the answer,
    as train.py) and prompts (other NQ-open questions). Random tokens of the same shapes (prompts
    of 1/4 to 1/2 of train_len, answers of 2 to 8 tokens) when the checkpoint has no tokenizer (tests)."""
    from loranull_mini import data
    n_large = cfg.calib_samples * cfg.calib_scale
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(1, vocab_size, (n_large, cfg.calib_len), generator=g)
        examples = []
        for _ in range(4 * cfg.train_batch):
            n_prompt = int(torch.randint(cfg.train_len // 4, cfg.train_len // 2 + 1, (), generator=g))
            n_answer = int(torch.randint(2, 9, (), generator=g))
            examples.append(data.Example(torch.randint(1, vocab_size, (n_prompt + n_answer,), generator=g).tolist(),
                                         n_prompt))
        train = training_batches(examples, cfg, pad_id=0)
        prompts = [torch.randint(1, vocab_size, (5 + 3 * i,), generator=g).tolist() for i in range(cfg.gen_batch)]
        return calib[:cfg.calib_samples], calib, train, prompts
    known = [r["question"] for r in data.nq_open("calibration")]
    other = [r["question"] for r in data.nq_open("heldout")]
    calib = data.calibration_windows(tokenizer, known, n_large, cfg.calib_len)
    examples = [data.encode_qa(tokenizer, r["question"], r["answer"]) for r in data.asdiv("train")]
    train = training_batches(examples, cfg, tokenizer.pad_id)
    prompts = [tokenizer.encode(f"Question: {q}?\nAnswer:") for q in other[-cfg.gen_batch:]]
    return calib[:cfg.calib_samples], calib, train, prompts


def load_stacks(cfg: BenchConfig, device, workdir: Path, log) -> Stacks:
    from loranull_mini.checkpoint import load_model
    from loranull_mini.checkpoint import save_hf
    ours, tokenizer = load_model(cfg.model or None)
    hf_dir = workdir / "hf"
    save_hf(ours, hf_dir)
    theirs = load_hf(hf_dir, device)
    ours.to(device)
    calib, calib_large, train, prompts = token_sets(cfg, tokenizer, ours.config.vocab_size)
    with torch.no_grad():
        window = calib[:1].to(device)
        parity = float((ours(window)[0] - theirs(input_ids=window).logits).abs().max())
    log(f"weights    {ours.num_params() / 1e6:.1f}M params, exported to {hf_dir}; "
        f"max |logits ours - HF| = {parity:.1e}")
    return Stacks(ours, theirs, hf_dir, calib, calib_large, train, prompts, parity)


# ----------------------------------------------------------------------------- results
def row(name, unit, ours, theirs, target=None, higher_is_better=False, columns=("ours", "theirs")):
    """One table row from the repeated measurements: medians, ratio ours / theirs, target met."""
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = a / b
    met = None
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    return {"name": name, "unit": unit, "ours": a, "theirs": b, "ratio": ratio, "target": target,
            "higher_is_better": higher_is_better, "met": met, "columns": list(columns),
            "ours_all": list(ours), "theirs_all": list(theirs)}


# ----------------------------------------------------------------------------- 1. init time
def calibration_batches(calib: torch.Tensor, batch: int, device) -> list:
    return [calib[i:i + batch].to(device) for i in range(0, len(calib), batch)]


def measure_null_vs_corda(cfg, stacks, device, log, windows: torch.Tensor, repeats: int | None = None,
                          basis: str = "fast") -> dict:
    """Our LoRA-Null (block by block: covariances, the null basis of train.py --null-basis
    `basis`, factors) against PEFT's CorDA-KPM (hooks on the whole model, one sequence per
    forward, then inverse + SVD per layer), both calibrated on `windows`."""
    import nullspace
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda

    from loranull_mini import calibration, fastbasis

    batches = calibration_batches(windows, cfg.calib_batch, device)
    windows = windows.to(device)

    def ours_init(model):
        calibration.inject_blockwise(model, batches, ALL_TARGETS, r=cfg.rank, alpha=cfg.alpha, init="null",
                                     dtype=torch.float32, keep_covariances=False,
                                     basis={"eigh": nullspace.null_basis, "fast": fastbasis.smallest_eigenvectors}[basis])

    def theirs_init(model):
        config = peft_config(cfg.rank, cfg.alpha, "corda")
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=w[None]) for w in windows])
        get_peft_model(model, config)

    ours, theirs = alternate(repeats or cfg.repeats,
                             lambda: timed(device, ours_init, lambda: copy.deepcopy(stacks.ours)),
                             lambda: timed(device, theirs_init, lambda: copy.deepcopy(stacks.theirs)))
    tokens = windows.numel()
    log(f"init       {tokens} calibration tokens, {basis} basis: LoRA-Null {fmt(ours)} s, PEFT CorDA {fmt(theirs)} s")
    return row(f"init: LoRA-Null ({basis} basis) vs PEFT CorDA-KPM ({tokens} calib. tokens), s", "s", ours, theirs,
               1 / 3)


def inject_pissa_lowrank(model, r: int, alpha: float, niter: int):
    """inject_lora(init="pissa") with the randomized SVD (torch.svd_lowrank, niter iterations)."""
    import lora
    for name in lora.target_module_names(model, ALL_TARGETS):
        layer = lora.wrap_linear(model, name, r, alpha)
        layer.initialize(*lora.pissa_init(layer.base.weight.detach(), r, alpha, niter=niter))
    lora.mark_only_lora_trainable(model)


def measure_pissa(cfg, stacks, device, log) -> list:
    """Our PiSSA against PEFT's, exact SVD and randomized SVD with 4 subspace iterations."""
    import lora
    import nullspace
    from peft import get_peft_model

    rows = []
    for init, ours_init in [
        ("pissa", lambda m: nullspace.inject_adapters(m, ALL_TARGETS, r=cfg.rank, alpha=cfg.alpha, init="pissa")),
        ("pissa_niter_4", lambda m: inject_pissa_lowrank(m, cfg.rank, cfg.alpha, niter=4)),
    ]:
        def theirs_init(model, init=init):
            get_peft_model(model, peft_config(cfg.rank, cfg.alpha, init))

        ours, theirs = alternate(
            cfg.repeats,
            lambda: timed(device, ours_init, lambda: seeded(copy.deepcopy(stacks.ours))),
            lambda: timed(device, theirs_init, lambda: seeded(copy.deepcopy(stacks.theirs))))
        what = "exact SVD" if init == "pissa" else "randomized SVD, niter 4"
        log(f"init       PiSSA {what}: ours {fmt(ours)} s, PEFT {fmt(theirs)} s")
        rows.append(row(f"init: PiSSA, {what}, s", "s", ours, theirs, 1.0))
    return rows


def seeded(model):
    torch.manual_seed(0)  # svd_lowrank and the default LoRA init draw from the global generator
    return model


def fmt(values) -> str:
    return " ".join(f"{v:.3g}" for v in values)


# ----------------------------------------------------------------------------- 2. training
def release_freed_memory():
    """Return freed heap pages to the OS (glibc), so the resident set is the live set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device):
    """Start a new high-water mark of this process's memory (RSS on CPU, allocated on CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set, to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak counts from the start of the process


def peak_memory(device) -> int:
    """Bytes: the high-water mark since reset_peak_memory (CPU: VmHWM, else ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_training(stack: str, settings: dict, device):
    """(training step function, trainable parameters) of one stack, LoRA on all seven projections.

    A step is train.py's: the mean NLL of a supervised batch's answer tokens (prompt and padding
    excluded), backward, AdamW. Ours projects to the vocabulary only at the answer positions
    (as train.answer_nll_sum); transformers computes the logits of every position and ignores the
    labels -100 (prompt, padding), the usual way to train it on such batches.
    """
    r, alpha, use_autocast = settings["rank"], settings["alpha"], device.type == "cuda"
    if stack == "ours":
        import lora
        from loranull_mini.checkpoint import load_model
        from model import masked_nll
        model, _ = load_model(settings["hf_dir"], device=device)
        lora.inject_lora(model, ALL_TARGETS, r=r, alpha=alpha)  # vanilla init, as PEFT's default

        def forward(batch):  # train.answer_nll_sum (a library module does not import the script)
            at = answer_positions(batch)
            logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"], logits_at=at)  # (N, V)
            return masked_nll(logits[None], batch["targets"][at][None])[0] / at.sum()
    else:
        from peft import get_peft_model
        model = get_peft_model(load_hf(settings["hf_dir"], device), peft_config(r, alpha))

        def forward(batch):
            labels = batch["targets"].masked_fill(~answer_positions(batch), -100)  # already shifted: shift_labels
            return model(input_ids=batch["idx"], attention_mask=batch["pad_mask"].long(), labels=labels,
                         shift_labels=labels).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batch) -> float:
        with autocast(device, use_autocast):
            loss = forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in params)


def train_worker(conn, stack: str, settings: dict):
    """Child process: build one stack, run a warm-up step on batch 0, then answer the parent's
    commands: "measure" (time settings["steps"] steps on the next batches; returns the seconds
    and the real tokens), "peak" (memory high-water mark), "stop"."""
    torch.manual_seed(0)
    device = torch.device(settings["device"])
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(settings["batches"])]
    step, n_trainable = build_training(stack, settings, device)
    release_freed_memory()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_memory()
    reset_peak_memory(device)
    first_loss = step(batches[0])  # warm-up, and a check that both stacks compute the same loss
    conn.send({"first_loss": first_loss, "trainable": n_trainable, "baseline_bytes": baseline})
    i = 1
    while (command := conn.recv()) != "stop":
        if command == "measure":
            tokens = 0
            start = now(device)
            for _ in range(settings["steps"]):
                batch = batches[i % len(batches)]
                step(batch)
                tokens += int(batch["pad_mask"].sum())
                i += 1
            conn.send((now(device) - start, tokens))
        elif command == "peak":
            conn.send(peak_memory(device))
    conn.close()


def resident_memory() -> int:
    """Bytes resident now (VmRSS), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_training(cfg, stacks, device, workdir: Path, log) -> list:
    """Tokens/s (real, non-pad tokens) and peak memory of LoRA training on supervised batches,
    each stack in its own child process, both on the same batches in the same order; the
    matmul peak is measured in this process between the two stacks' timings."""
    batches_file = workdir / "train_batches.pt"
    torch.save(stacks.train, batches_file)
    settings = {"device": str(device), "hf_dir": str(stacks.hf_dir), "batches": str(batches_file),
                "rank": cfg.rank, "alpha": cfg.alpha, "steps": cfg.train_steps}
    context = multiprocessing.get_context("spawn")
    workers, hello = {}, {}
    try:
        for stack in ("ours", "theirs"):  # both load at once: loading is not measured
            parent, child = context.Pipe()
            process = context.Process(target=train_worker, args=(child, stack, settings), daemon=True)
            process.start()
            child.close()  # the child's end lives in the child: its exit then reads as EOF here
            workers[stack] = (process, parent)
        for stack, (process, conn) in workers.items():
            hello[stack] = receive(conn, process)
        n = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        measured, peaks = {"ours": [], "theirs": []}, []
        for _ in range(cfg.repeats):
            for stack, (process, conn) in workers.items():
                conn.send("measure")
                measured[stack].append(receive(conn, process))
            peaks.append(matmul_flops_per_s(device, n, dtype))
        memory = {}
        for stack, (process, conn) in workers.items():
            conn.send("peak")
            memory[stack] = receive(conn, process)
            conn.send("stop")
            process.join(timeout=60)
    finally:
        for process, _ in workers.values():
            if process.is_alive():
                process.kill()
    rate = {s: [tokens / seconds for seconds, tokens in m] for s, m in measured.items()}
    # The FLOPs each stack does: the same blocks on every (padded) position; the vocabulary
    # projection at the answer positions (ours) or at every position (transformers).
    config, timed_batches = stacks.ours.config, stacks.train[1:]
    steps = [timed_batches[k % len(timed_batches)] for k in range(cfg.repeats * cfg.train_steps)]

    def flops(b, stack):
        B, T = b["idx"].shape
        return training_flops(config, cfg.rank, ALL_TARGETS, B, T,
                              output_tokens=int(answer_positions(b).sum()) if stack == "ours" else B * T)
    achieved = {}
    for stack, m in measured.items():
        per_repeat = [sum(flops(b, stack) for b in steps[k * cfg.train_steps:(k + 1) * cfg.train_steps])
                      for k in range(cfg.repeats)]
        achieved[stack] = [f / seconds for f, (seconds, _) in zip(per_repeat, m)]
    peak = statistics.median(peaks)
    real = sum(int(b["pad_mask"].sum()) for b in steps)
    padded = sum(b["idx"].numel() for b in steps)
    answers = sum(int(answer_positions(b).sum()) for b in steps)
    log(f"train      tokens/s ours {fmt(rate['ours'])}, HF+PEFT {fmt(rate['theirs'])}; peak memory "
        f"{memory['ours'] / 2**20:.0f} / {memory['theirs'] / 2**20:.0f} MiB; first losses "
        f"{hello['ours']['first_loss']:.5f} / {hello['theirs']['first_loss']:.5f}; batches of {cfg.train_batch}: "
        f"{real} real of {padded} padded positions, {answers} answer tokens")
    rows = [
        row(f"train: tokens/s, supervised batches of {cfg.train_batch} (fwd + bwd + AdamW)", "tokens/s",
            rate["ours"], rate["theirs"], 1.1, True),
        row("train: peak memory, MiB", "MiB", [memory["ours"] / 2**20], [memory["theirs"] / 2**20], 0.9),
        row("train: achieved GFLOP/s (each stack's own matmuls)", "GFLOP/s", [a / 1e9 for a in achieved["ours"]],
            [a / 1e9 for a in achieved["theirs"]], None, True),
        row(f"train: share of dense matmul peak ({peak / 1e9:.0f} GFLOP/s), %", "%",
            [100 * a / peak for a in achieved["ours"]], [100 * a / peak for a in achieved["theirs"]], None, True),
    ]
    rows[0]["first_loss"] = {s: h["first_loss"] for s, h in hello.items()}
    rows[0]["positions"] = {"real": real, "padded": padded, "answer": answers}
    rows[1]["baseline_MiB"] = {s: h["baseline_bytes"] / 2**20 for s, h in hello.items()}
    rows[3]["matmul_flops_per_s"] = peaks
    return rows


def receive(conn, process, timeout: float = 1800):
    """The child's next message; a clear error if it died or hangs instead of answering."""
    deadline = time.time() + timeout
    while not conn.poll(1.0):
        if not process.is_alive() or time.time() > deadline:
            process.join(timeout=5)
            raise RuntimeError(f"training worker {process.name} stopped answering "
                               f"(exit code {process.exitcode}); its error is printed above")
    try:
        return conn.recv()
    except EOFError:
        process.join(timeout=5)
        raise RuntimeError(f"training worker {process.name} exited with code {process.exitcode}; "
                           f"its error is printed above") from None


# ----------------------------------------------------------------------------- 3. generation
def measure_generation(cfg, stacks, device, log) -> dict:
    """Greedy batched decoding with the KV cache, left-padded prompts, a fixed number of new
    tokens (no stop token), against transformers' generate."""
    from model import generate

    prompts, n_new = stacks.prompts, cfg.gen_tokens
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    use_autocast = device.type == "cuda"

    def ours():
        with autocast(device, use_autocast):
            return generate(stacks.ours, prompts, max_new_tokens=n_new)

    def theirs():
        with autocast(device, use_autocast), torch.no_grad():
            out = stacks.theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                         min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                         eos_token_id=None)
        return out[:, width:].tolist()

    same = sum(a == b for a, b in zip(ours(), theirs()))  # warm-up, and the same greedy text?
    seconds_ours, seconds_theirs = alternate(cfg.repeats, lambda: timed(device, ours), lambda: timed(device, theirs))
    tokens = len(prompts) * n_new
    result = row(f"generate: tokens/s, greedy, batch {len(prompts)}, KV cache", "tokens/s",
                 [tokens / s for s in seconds_ours], [tokens / s for s in seconds_theirs], 1.0, True)
    result["same_greedy_rows"] = f"{same}/{len(prompts)}"
    log(f"generate   tokens/s ours {fmt(result['ours_all'])}, HF {fmt(result['theirs_all'])}; "
        f"identical greedy continuations {same}/{len(prompts)}")
    return result


# ----------------------------------------------------------------------------- padding-free training
def unpadded(batch: dict) -> list:
    """The examples of a right-padded batch (data.collate's inverse)."""
    from loranull_mini import data
    out = []
    for b in range(batch["idx"].shape[0]):
        n = int(batch["pad_mask"][b].sum())
        ids = batch["idx"][b, :n].tolist() + [int(batch["targets"][b, n - 1])]
        out.append(data.Example(ids, int(batch["loss_mask"][b].nonzero()[0]) + 1))
    return out


def measure_packing(cfg, stacks, device, log) -> dict:
    """Our training step (LoRA on all seven projections, AdamW) on packed rows against the same
    examples padded, alternating step by step; tokens/s counts real tokens only."""
    import lora
    from loranull_mini import data
    from model import masked_nll

    model = copy.deepcopy(stacks.ours)
    lora.inject_lora(model, ALL_TARGETS, r=cfg.rank, alpha=cfg.alpha)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    padded = [{k: v.to(device) for k, v in b.items()} for b in stacks.train]
    packed = [{k: v.to(device) for k, v in data.pack(unpadded(b), 0, cfg.train_len).items()} for b in stacks.train]

    def step(batch):
        with autocast(device, device.type == "cuda"):
            at = answer_positions(batch)
            logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"], logits_at=at, segments=batch.get("segments"))
            loss = masked_nll(logits[None], batch["targets"][at][None])[0] / at.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def rate(batches, first):
        def run():
            for b in batches[first:first + cfg.train_steps]:
                step(b)
        seconds = timed(device, run)
        return sum(int(b["pad_mask"].sum()) for b in batches[first:first + cfg.train_steps]) / seconds

    step(padded[0]), step(packed[0])  # warm-up
    rates_packed, rates_padded = [], []
    for rep in range(cfg.repeats):
        first = 1 + rep * cfg.train_steps
        rates_packed.append(rate(packed, first))
        rates_padded.append(rate(padded, first))
    result = row(f"train: padding-free rows vs padded, tokens/s, batch {cfg.train_batch}", "tokens/s",
                 rates_packed, rates_padded, 1.0, True, columns=("packed", "padded"))
    result["padding_fraction"] = {"padded": statistics.mean(data.padding_fraction(b) for b in padded),
                                  "packed": statistics.mean(data.padding_fraction(b) for b in packed)}
    log(f"pack       tokens/s packed {fmt(rates_packed)}, padded {fmt(rates_padded)}; padding "
        f"{result['padding_fraction']['padded']:.1%} -> {result['padding_fraction']['packed']:.1%} of positions, "
        f"rows {statistics.mean(len(b['idx']) for b in packed):.1f} vs {cfg.train_batch}")
    return result


# ----------------------------------------------------------------------------- 4. calibration
def measure_calibration(cfg, stacks, device, log) -> dict:
    """Block-by-block covariance collection against a plain forward of the same calibration
    batches: float32 products with float64 sums (dtype=torch.float64 would double the
    products' cost); no autocast, the covariances are wanted at float32 precision also on CUDA."""
    from loranull_mini import calibration

    batches = calibration_batches(stacks.calib, cfg.calib_batch, device)
    model = stacks.ours

    def forward():
        with torch.no_grad():
            for idx in batches:
                model(idx)

    blockwise, plain = alternate(cfg.repeats, lambda: timed(device, lambda: calibration.calibrate_blockwise(
        model, batches, dtype=torch.float32, keep_covariances=False)), lambda: timed(device, forward))
    log(f"calibrate  block by block {fmt(blockwise)} s, plain forward {fmt(plain)} s")
    return row("calibration: covariances vs plain forward, s", "s", blockwise, plain, 1.3,
               columns=("ours", "plain forward"))


# ----------------------------------------------------------------------------- table
def table(rows: list) -> str:
    """Markdown table: measurement, ours, theirs, ratio ours/theirs, target, met."""
    lines = ["| measurement | ours | theirs | ratio ours/theirs | target | met |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        theirs = f"{r['theirs']:.4g}" + ("" if r["columns"][1] == "theirs" else f" ({r['columns'][1]})")
        target = "-" if r["target"] is None else ((">= " if r["higher_is_better"] else "<= ") + f"{r['target']:.3g}")
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['name']} | {r['ours']:.4g} | {theirs} | {r['ratio']:.3f} | {target} | {met} |")
    return "\n".join(lines)


# What dominates each measurement: printed under the table when its target is missed.
WHY_MISSED = {
    "init: LoRA-Null (eigh basis)": "the default null basis is one float64 eigendecomposition per distinct input "
                                    "(4 per block), about half of this init: the fast-basis rows below differ in "
                                    "that alone (train.py --null-basis fast)",
    "init: LoRA-Null": "our init is the calibration (see the calibration row: the X^T X products cost about "
                       "half a forward) plus the null bases (fastbasis: one Cholesky and a few block solves "
                       "per distinct input, 4 per block) and the factors of every layer in float64; PEFT's "
                       "CorDA runs one sequence per forward with hooks and an inverse + SVD per projection. "
                       "The calibration share grows with the tokens, so the ratio does not fall with them",
    "init: PiSSA": "both stacks run the same LAPACK SVD (exact) or torch.svd_lowrank (randomized) on every "
                   "weight, almost all of the time; the rest is bookkeeping, so the ratio is 1 within noise",
    "train: tokens/s": "both stacks run the same matmuls; ours projects to the vocabulary only at the answer "
                       "tokens, saves the k/v copies of grouped-query attention and fuses the LoRA add",
    "train: peak memory": "both hold the same weights and activations; ours holds logits only at the answer tokens",
    "train: padding-free": "packed rows drop the padding's positions but attend over longer rows "
                           "(a (T, T) block-diagonal mask per row instead of each example's own length)",
    "generate": "decoding a small batch is bound by reading the weights every step, the same for both",
    "calibration": "X^T X of the 4 distinct inputs of a block, formed from the lower row panels only (about "
                   "0.54 of the full products), still costs about half of the block's own matmuls at "
                   "SmolLM2's widths (576, 576, 576, 1536 against a 576 x 1536 MLP)",
}


def missed_notes(rows: list) -> list[str]:
    notes = []
    for r in rows:
        if r["met"] is False:
            why = next((text for key, text in WHY_MISSED.items() if r["name"].startswith(key)), "")
            notes.append(f"target missed: {r['name']} (ratio {r['ratio']:.3f}): {why}")
    return notes


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    cfg = parse_args(argv) if not isinstance(argv, BenchConfig) else argv
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is available")
    groups = set(filter(None, cfg.only.split(","))) or set(GROUPS)
    log = print
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="loranull-bench-") as tmp:
        workdir = Path(tmp)
        stacks = load_stacks(cfg, device, workdir, log)
        rows = []
        if "init" in groups:
            rows.append(measure_null_vs_corda(cfg, stacks, device, log, stacks.calib, basis="eigh"))  # the default
            rows.append(measure_null_vs_corda(cfg, stacks, device, log, stacks.calib, basis="fast"))
            # once: PEFT's CorDA alone takes minutes there (one sequence per forward, hooks on every layer)
            rows.append(measure_null_vs_corda(cfg, stacks, device, log, stacks.calib_large, repeats=1))
        if "pissa" in groups:
            rows += measure_pissa(cfg, stacks, device, log)
        if "train" in groups:
            rows += measure_training(cfg, stacks, device, workdir, log)
        if "pack" in groups:
            rows.append(measure_packing(cfg, stacks, device, log))
        if "generate" in groups:
            rows.append(measure_generation(cfg, stacks, device, log))
        if "calibrate" in groups:
            rows.append(measure_calibration(cfg, stacks, device, log))
    environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
                   "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "seconds": time.time() - started, "max_abs_logit_difference": stacks.parity,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    for package in ("transformers", "peft"):
        environment[package] = __import__(package).__version__
    print()
    print(f"ours vs transformers {environment['transformers']} + peft {environment['peft']} on "
          f"{environment['device']} ({environment['dtype']}, {environment['threads']} threads, "
          f"{environment['cpus']} CPUs), medians of {cfg.repeats}{' (--quick)' if cfg.quick else ''}; "
          f"LoRA r={cfg.rank}, alpha={cfg.alpha:g}, all seven projections; calibration windows of "
          f"{cfg.calib_len} tokens; training batches of {cfg.train_batch}, {cfg.train_steps} step(s) per repeat")
    print(table(rows))
    for note in missed_notes(rows):
        print(note)
    print(f"{environment['date']}; load average before/after: {load_before[0]:.2f} / "
          f"{environment['load_average_after'][0]:.2f}; {environment['seconds']:.0f} s in all")
    result = {"config": dataclasses.asdict(cfg), "environment": environment, "rows": rows}
    if cfg.json:
        from loranull_mini.files import write_json
        write_json(cfg.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
