"""A training run's state on disk: resumable checkpoints, the metrics log, the run's history.

    OUT/checkpoint.pt      step, config, every adapter tensor, optimizer state, random states,
                           and a sha256 of the tensors (verified on resume)
    OUT/metrics.jsonl      one JSON row per step (loss, lr, ...), plus the evaluations
    OUT/run.json           the settings the run started with and one entry per resume
    OUT/covariances.safetensors   the calibration covariances, when asked for

A checkpoint is written only once its weights have given a finite loss and a gradient in the
next step; a held-out loss that stays above where it started (DivergenceWatch) stops the run.
Guard is the one call the training loop makes for all of it.

Every file is replaced atomically (loranull_mini/files.py), and a checkpoint is written only
from finite adapter weights: a killed or diverged run always leaves the last good state.
"""
from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import lora
from loranull_mini.files import (atomic_write, process_alive, read_json, remove_stale_temporaries, tensors_sha256,
                                 write_json, write_text)

CHECKPOINT, METRICS, RUN = "checkpoint.pt", "metrics.jsonl", "run.json"
LOCK, ADAPTER, SUMMARY = ".lock", "adapter", "summary.json"
FINISHED = (ADAPTER, "adapter-delta", SUMMARY, "model")  # what a finished run leaves besides its checkpoint

# Settings a resumed run must share with its checkpoint (the rest, e.g. --steps, may change).
RESUME_MUST_MATCH = ("init", "freeze_a", "preset", "toy_overlap", "model", "rank", "alpha", "targets", "dropout", "data", "max_len",
                     "calib_source", "calib_samples", "calib_len", "batch_size", "grad_accum", "seed",
                     "weight_decay")


# ----------------------------------------------------------------------------- random states
def random_states(device: torch.device) -> dict:
    """This process's random states: the CPU generator and, on CUDA, the device's."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_random_states(states: dict, device: torch.device):
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def all_random_states(device: torch.device, world: int) -> list[dict]:
    """Every rank's random states, in rank order (one collective call; all ranks take part)."""
    mine = random_states(device)
    if world == 1:
        return [mine]
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
    return gathered


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, step: int, adapters: dict, optimizer, config: dict, rng: list[dict], start: dict):
    """Step, config, adapter tensors (A, B and the init's A0, B0), optimizer, every rank's
    random states, the evaluation at step 0, and the sha256 of the adapter tensors.
    Refuses non-finite tensors."""
    adapters = {k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    bad = [k for k, v in adapters.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"adapter tensors {bad[:3]} are not finite: checkpoint {path} not written")
    state = {"step": step, "config": config, "adapters": adapters, "adapters_sha256": tensors_sha256(adapters),
             "optimizer": optimizer.state_dict(), "rng": rng, "start": start}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path, config: dict) -> dict:
    """A verified checkpoint: readable, its tensors unchanged since saving (sha256), finite,
    and made with the settings a resume must share (RESUME_MUST_MATCH)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupted?): {e}") from None
    keys = ("step", "config", "adapters", "adapters_sha256", "optimizer", "rng", "start")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ValueError(f"{path} is not a loranull-mini training checkpoint (expected the keys {keys})")
    if tensors_sha256(state["adapters"]) != state["adapters_sha256"]:
        raise ValueError(f"checkpoint {path}: its adapter tensors do not match the sha256 recorded when it "
                         f"was saved (the file was changed or damaged)")
    if any(not torch.isfinite(v).all() for v in state["adapters"].values()):
        raise ValueError(f"checkpoint {path} holds non-finite adapter values")
    changed = {k: (state["config"].get(k), config.get(k)) for k in RESUME_MUST_MATCH
               if state["config"].get(k) != config.get(k)}
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint {path} (saved, given): {changed}")
    if config["steps"] < state["step"] or (config["steps"] == state["step"] and finished(path.parent, state["step"])):
        raise ValueError(f"--steps {config['steps']} is not beyond the checkpoint's step {state['step']} "
                         f"in {path}: nothing left to train")
    return state


def finished(out: Path, step: int) -> bool:
    """Whether out holds the complete outputs of a run trained to `step`: a kill after the last
    checkpoint but before these were all written leaves a run that --resume still finishes."""
    from loranull_mini.adapter_io import read_adapter
    if not (out / SUMMARY).is_file():
        return False
    try:
        cfg, _ = read_adapter(out / ADAPTER)
        read_adapter(out / "adapter-delta")
    except (ValueError, OSError):
        return False
    return cfg.get("steps_trained") == step


# ----------------------------------------------------------------------------- the output directory
def check_fresh_out(out: Path):
    """A fresh run refuses a directory holding a run's checkpoint or a finished run's outputs
    (also when the checkpoint was deleted to save space)."""
    for name in (CHECKPOINT, *FINISHED):
        if (out / name).exists():
            hint = "pass --resume to continue it" if name == CHECKPOINT else "it holds a finished run"
            raise FileExistsError(f"{out / name} exists: {hint}, or choose another --out")


def lock_out(out: Path):
    """Take OUT/.lock for this process: a second run into the same directory is refused while
    the first is alive; a lock left by a dead process is taken over. Released at exit."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError:
            return  # a read-only directory: nothing can be written there, the first write says so
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return
            if pid and process_alive(pid):
                raise FileExistsError(f"{out} is in use by another run (process {pid}, {path}): wait for it to "
                                      f"end, or choose another --out") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        atexit.register(unlock_out, out)
        for directory in (out, out / ADAPTER):    # what a killed run of this directory left half-written
            remove_stale_temporaries(directory)
        return
    raise FileExistsError(f"cannot take the lock {path}: another run took it meanwhile")


def unlock_out(out: Path):
    path = Path(out) / LOCK
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def save_state(out: Path, step: int, rng: list, model, optimizer, config: dict, metrics: list, start: dict,
               proc: int):
    """The metrics log up to `step`, then the checkpoint of `step` (process 0 writes). Called
    before the next optimizer step, so the adapters and the optimizer are still those of `step`."""
    if proc == 0:
        write_metrics(out / METRICS, metrics)  # first: a resume drops the rows past the checkpoint
        save_checkpoint(out / CHECKPOINT, step, lora.lora_state_dict(model), optimizer, config, rng, start)


def good_checkpoint(out) -> str:
    path = None if out is None else Path(out) / CHECKPOINT
    if path is None or not path.is_file():
        return "no checkpoint was written before this point"
    step = torch.load(path, map_location="cpu", weights_only=True)["step"]
    return f"the checkpoint {path} (step {step}) is from before and is good"


class DivergenceWatch:
    """A held-out loss more than 10% above where it started is suspicious; `patience`
    suspicious evaluations in a row mean the run diverged."""

    def __init__(self, start: float, patience: int = 2):
        self.start, self.limit, self.patience, self.count = start, 1.1 * start, patience, 0

    @property
    def suspicious(self) -> bool:
        return self.count > 0

    def diverged(self, loss: float) -> bool:
        self.count = self.count + 1 if not loss <= self.limit else 0  # NaN counts as above
        return self.count >= self.patience


class Guard:
    """The training loop's guards, each one call: finite loss, gradient and weights; the
    divergence watch on the held-out loss; and the deferred checkpoint, written only once its
    weights have given a finite loss and a gradient in the next step (the last one: a finite
    final evaluation). Every stop raises FloatingPointError naming the last good checkpoint."""

    def __init__(self, out, start: dict, config: dict, device, proc: int, world: int):
        self.out, self.start, self.config, self.device, self.proc, self.world = out, start, config, device, proc, world
        self.watch = DivergenceWatch(start["heldout_loss"])
        self.due = None                                # (step, random states) of a checkpoint not yet tried

    def stop(self, what: str, advice: str):
        raise FloatingPointError(f"{what}; {good_checkpoint(self.out)}: {advice}")

    def step_went_well(self, loss, grad_norm, step: int, lr: float):
        """After backward: a finite loss and a nonzero gradient, else the run stops."""
        if not torch.isfinite(loss):
            self.stop(f"loss is {loss.item()} at step {step}", "lower --lr and --resume")
        if float(grad_norm) == 0:
            self.stop(f"the gradient is exactly zero at step {step} (loss {loss.item():.4f}): the model's outputs "
                      f"no longer depend on the adapter (its activations overflowed at lr {lr:g})",
                      "lower --lr (and --resume, or start afresh)")

    def write_due(self, model, optimizer, metrics: list):
        """The checkpoint deferred from the last step, now that its weights gave a finite loss and gradient."""
        if self.due is not None:
            save_state(self.out, *self.due, model, optimizer, self.config, metrics, self.start, self.proc)
            self.due = None

    def weights_finite(self, params, step: int, lr: float):
        if not all(torch.isfinite(p).all() for p in params):
            self.stop(f"the adapter weights are not finite after step {step} (lr {lr:.3g})", "lower --lr and --resume")

    def evaluated(self, heldout_loss: float, lr: float):
        if self.watch.diverged(heldout_loss):
            self.stop(f"the held-out loss {heldout_loss:.4f} has stayed above {self.watch.limit:.4f} (the starting "
                      f"{self.watch.start:.4f} + 10%) for {self.watch.patience} evaluations: the run diverged at lr "
                      f"{lr:g}", "lower --lr (and --resume, or start afresh)")

    def checkpoint(self, step: int, last: bool, model, optimizer, metrics: list):
        """A checkpoint of `step`: deferred to the next step, or written now after the final evaluation."""
        if self.out is None or self.watch.suspicious:
            return
        self.due = (step, all_random_states(self.device, self.world))  # a collective: every process takes part
        if last:
            save_state(self.out, *self.due, model, optimizer, self.config, metrics, self.start, self.proc)

    def finish(self, lr: float):
        if self.watch.suspicious:
            self.stop(f"the held-out loss ended above {self.watch.limit:.4f}, 10% over where it started: the run "
                      f"did not learn at lr {lr:g}", "lower --lr")


def restore(resumed: dict, optimizer, device, proc: int) -> tuple[int, list, dict]:
    """(step, metrics rows, step-0 evaluation) of a resumed run, its optimizer and random states set."""
    optimizer.load_state_dict(resumed["optimizer"])
    set_random_states(resumed["rng"][min(proc, len(resumed["rng"]) - 1)], device)
    return resumed["step"], list(resumed["metrics"]), resumed["start"]


def save_covariances(path: Path, covariances: dict):
    """Each distinct covariance once (layers sharing an input share a tensor), atomically."""
    from safetensors.torch import save_file
    distinct = {}
    for name, C in covariances.items():
        distinct.setdefault(id(C), (name, C))
    tensors = {name: C.contiguous().cpu() for name, C in distinct.values()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


# ----------------------------------------------------------------------------- metrics and history
def write_metrics(path: Path, rows: list[dict]):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The rows of a metrics log up to a step (a resume drops the rows past its checkpoint)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing but the checkpoint is at step {up_to_step}: a resume would "
                                f"lose the log and restart the token count; put it back, or start afresh in another --out")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); fix or delete the line") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{number}: a metrics row needs an integer 'step'")
            rows.append(row)
    steps = [r["step"] for r in rows if r["step"] <= up_to_step]
    if steps != list(range(1, up_to_step + 1)):
        have = f"steps {steps[0]}..{steps[-1]} ({len(steps)} rows)" if steps else "no rows"
        raise ValueError(f"{path} holds {have} but the checkpoint is at step {up_to_step}: the log was truncated, "
                         f"edited or deleted, and a resume would lose its rows and token count; put it back, "
                         f"or start afresh in another --out")
    return [r for r in rows if r["step"] <= up_to_step]


def record_run(out: Path, config: dict, resumed_from: int | None) -> dict:
    """run.json: the settings the run started with, never rewritten; each resume appends
    {step, settings that changed}. Returns the record."""
    path = out / RUN
    record = read_json(path, missing_ok=True)
    if record is None or resumed_from is None:
        record = {"config": config, "resumes": []}
    else:
        changed = {k: v for k, v in config.items() if record["config"].get(k) != v and k != "resume"}
        record["resumes"].append({"step": resumed_from, "changed": changed})
    write_json(path, record)
    return record
