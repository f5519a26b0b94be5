"""A study: every method x learning rate x seed, measured as eval.py measures, resumable.

    python eval.py --suite toy            # the toy world, three overlap settings
    python eval.py --suite real [--quick] # SmolLM2-135M on ASDiv, calibrated on NQ-open

One study, fixed before it runs (SUITES): the methods, a factor-2 learning-rate grid that
is extended while the best mean validation loss sits at an edge, the seeds, the steps and
evaluation points, and the task loss at which retention is compared. For each seed the
calibration is computed once, and each method's initialisation once, then reused by every
learning rate. A seed changes the adapter's random init, the data order and the
calibration sample (toy: the world as well, see toy.py).

Each training run is evaluated at every eval_every steps (retention KL and validation
loss: points on the method's trade-off curve) and in full at its end. Every run's result
is a JSON file in OUT/runs/, written when the run ends: a killed study resumes where it
stopped, on any machine (the results are plain numbers). The report (loranull_mini/report.py)
is rebuilt from those files.

eval.py hands in its measurements and train.py's loop (Measures): this module runs them.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import lora
import nullspace
from loranull_mini import adapter_io, calibration, report, stats
from loranull_mini.devices import pick_device
from loranull_mini.files import read_json, write_json

METHODS = {  # label -> (init, A frozen)
    "lora": ("vanilla", False), "pissa": ("pissa", False), "milora": ("milora", False), "corda": ("corda", False),
    "null": ("null", False), "null-v2": ("null", True),
    # the controls: A frozen at random (LoRA-FA), A frozen in the most used directions, and LoRA-Null's
    # space without moving weight into the adapter (A trained, and A frozen)
    "lora-fa": ("vanilla", True), "top-fa": ("top", True), "space": ("space", False), "space-fa": ("space", True),
}
CONTROLS = ("lora", "lora-fa", "null-v2", "space-fa", "top-fa")
# Evaluation set sizes of the real suites (each run is evaluated several times on a CPU budget):
# 200 Wikipedia passages of 32 tokens for the KL, 48 validation problems for the curves' task loss.
REAL_SIZES = {"wiki": 200, "wiki_tokens": 32, "nq": 100, "nq_em": 32, "mmlu": 48, "tqa": 48, "val": 48,
              "test": 64, "test_acc": 32, "top_k": 512}
QUICK_SIZES = {"wiki": 200, "wiki_tokens": 16, "nq": 48, "nq_em": 16, "mmlu": 24, "tqa": 24, "val": 24,
               "test": 32, "test_acc": 16, "top_k": 256}

SUITES = {
    # Toy: all methods where the new skill's inputs point at random, the core controls where they
    # point into the calibration's top or bottom eigenspace. target: skill validation loss (nats).
    "toy": dict(preset="toy", seeds=(0, 1, 2), lrs=(2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2), max_extensions=2,
                steps=100, batch_size=32, eval_every=25, warmup=10, rank=8, alpha=16.0, target=2.5,
                full_eval="every", variants={"random": tuple(METHODS), "top": CONTROLS, "bottom": CONTROLS}),
    # SmolLM2: all methods calibrated on NQ-open; LoRA-Null v2 also calibrated on Wikipedia and on the
    # task's own prompts (LoRA-FA does not read the calibration). target: ASDiv validation loss. The
    # multiple-choice probes, exact match and the test split are measured at each method's chosen
    # learning rate (every run keeps its adapter until then); retention KL and the validation loss
    # at every evaluation point of every run.
    "real": dict(preset="real", seeds=(0, 1, 2), lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3), max_extensions=2,
                 steps=20, batch_size=8, eval_every=10, warmup=2, rank=8, alpha=16.0, target=2.0,
                 calib_samples=16, calib_len=256, full_eval="chosen", sizes=REAL_SIZES,
                 variants={"nq-open": tuple(METHODS), "wiki": ("null-v2",), "task": ("null-v2",)}),
    "real-quick": dict(preset="real", seeds=(0, 1), lrs=(1e-3, 2e-3, 4e-3), max_extensions=0,
                       steps=6, batch_size=8, eval_every=6, warmup=1, rank=8, alpha=16.0, target=3.0,
                       calib_samples=8, calib_len=128, full_eval="chosen", sizes=QUICK_SIZES,
                       variants={"nq-open": ("lora", "lora-fa", "null-v2", "space-fa")}),
    # Which knowledge does the null space protect? LoRA-Null v2 at real-quick's settings, calibrated on
    # Wikipedia passages and on the task's own prompts (real-quick has it calibrated on NQ-open; LoRA-FA
    # reads no calibration, so its numbers there hold for every calibration text).
    "real-calibration": dict(preset="real", seeds=(0, 1), lrs=(1e-3, 2e-3, 4e-3), max_extensions=0,
                             steps=6, batch_size=8, eval_every=6, warmup=1, rank=8, alpha=16.0, target=3.0,
                             calib_samples=8, calib_len=128, full_eval="chosen", sizes=QUICK_SIZES,
                             variants={"wiki": ("null-v2",), "task": ("null-v2",)}),
}


@dataclass
class Measures:
    """What eval.py and train.py hand in: the probes, the measurements and the training loop."""
    prepare_real: Callable
    prepare_toy: Callable
    reference: Callable
    evaluate: Callable
    load_model_and_data: Callable
    finetune: Callable
    TrainConfig: type
    sizes: dict                 # eval.py's evaluation set sizes, for a suite that does not set its own


def run(suite: str, quick: bool, measure: Measures, *, out: str = "", device: str = "auto", workers: int = 1,
        report_only: bool = False) -> dict:
    name = "real-quick" if suite == "real" and quick else suite
    settings = {"suite": name, **SUITES[name]}
    out = Path(out or f"runs/eval-{name}")
    check_settings(out, settings)
    if not report_only:
        Study(settings, measure, out, device).run_all(workers)
    return report.write(out, settings, load_results(out), METHODS)


def check_settings(out: Path, settings: dict):
    """A study folder holds one study: resuming with other settings would mix budgets."""
    old = read_json(out / "settings.json", missing_ok=True)
    fresh = report.jsonable(settings)
    if old is not None and old != fresh:
        raise ValueError(f"{out} holds a study with other settings ({out / 'settings.json'}); choose another --out")
    write_json(out / "settings.json", fresh)


def run_key(variant: str, method: str, lr: float, seed: int) -> str:
    return f"{variant}/{method}/lr{lr:g}-seed{seed}"


def load_results(out: Path) -> list[dict]:
    return [read_json(p) for p in sorted((out / "runs").glob("*/*/*.json"))]


def next_lr(mean_loss: dict[float, float], extensions_left: int) -> float | None:
    """The learning rate to add to a grid whose best mean loss sits at an edge: half the
    smallest or twice the largest; None when the best is inside (or nothing is left)."""
    best, grid = stats.best_lr(mean_loss), sorted(mean_loss)
    if best is None or extensions_left <= 0:
        return None
    if best == grid[0]:
        return grid[0] / 2
    if best == grid[-1]:
        return grid[-1] * 2
    return None


class Study:
    def __init__(self, settings: dict, measure: Measures, out: Path, device: str):
        self.s, self.m, self.out, self.device_name = settings, measure, out, device
        self.device, self.autocast = pick_device(device)
        self.worlds, self.inits, self.shared = {}, {}, None
        self.rank, self.alpha = settings["rank"], settings["alpha"]

    def run_all(self, workers: int = 1):
        """Every (variant, method) of the study, in this process or in `workers` processes
        (one thread each)."""
        t0 = time.time()
        tasks = [(variant, method) for variant, methods in self.s["variants"].items() for method in methods]
        tasks.sort(key=lambda t: (t[0] != next(iter(self.s["variants"])), t[1] not in CONTROLS))  # controls first
        if workers == 1:
            for variant, method in tasks:
                self.run_method(variant, method)
        else:
            import multiprocessing
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, initializer=_worker_start, initargs=(self.s, self.m, self.out, self.device_name),
                              maxtasksperchild=None) as pool:
                for _ in pool.imap_unordered(_worker_run, tasks):
                    pass
        say(f"all runs done ({(time.time() - t0) / 60:.1f} min in this session)")

    def run_method(self, variant: str, method: str):
        """All learning rates and seeds of one method, the grid extended while its best mean
        validation loss sits at an edge (at most max_extensions times)."""
        grid, extensions = list(self.s["lrs"]), self.s["max_extensions"]
        while True:
            for lr in grid:
                for seed in self.s["seeds"]:
                    self.result(variant, method, lr, seed)
            losses = {lr: mean_final_loss([self.result(variant, method, lr, seed) for seed in self.s["seeds"]])
                      for lr in grid}
            lr = next_lr(losses, extensions)
            if lr is None:
                break
            grid.append(lr)
            extensions -= 1
            say(f"{variant} {method}: best validation loss at the edge of the grid, adding lr {lr:g}")
        if self.s["full_eval"] == "chosen":
            chosen = stats.best_lr(losses)
            for seed in self.s["seeds"] if chosen is not None else ():
                self.full_evaluation(variant, method, chosen, seed)
        self.inits = {k: v for k, v in self.inits.items() if k[:2] != (variant, method)}
        if method == self.s["variants"][variant][-1]:
            self.worlds = {k: v for k, v in self.worlds.items() if k[1] != variant}  # free its calibration

    # --------------------------------------------------------------------------- one run
    def result(self, variant: str, method: str, lr: float, seed: int) -> dict:
        path = self.out / "runs" / f"{run_key(variant, method, lr, seed)}.json"
        cached = read_json(path, missing_ok=True)
        if cached is not None:
            return cached
        t0 = time.time()
        world = self.world(seed, variant)
        init, frozen = METHODS[method]
        cfg = self.m.TrainConfig(**self.train_settings(variant, seed), init=init, freeze_a=frozen, lr=lr)
        model = copy.deepcopy(world["base"])
        layers = self.start(world, method, seed, model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
        n_evals = 1 + len({s for s in range(1, cfg.steps + 1) if s % cfg.eval_every == 0 or s == cfg.steps})
        calls = []

        def evaluate(m):  # finetune's evaluation points: none at step 0 (the base point), full at the end
            calls.append(None)
            if len(calls) == 1:
                return {}
            full = len(calls) == n_evals and self.s["full_eval"] == "every"
            return {"eval": self.m.evaluate(m, world["tok"], world["probes"], world["ref"], full=full)}

        row = {"variant": variant, "method": method, "lr": lr, "seed": seed}
        try:
            trained = self.m.finetune(cfg, model, layers, optimizer, world["data"], world["tok"].pad_id,
                                      world["covariances"], self.device, self.autocast, log=lambda *a, **k: None,
                                      evaluate=evaluate, progress=False)
        except FloatingPointError as e:  # a diverged run stays in the grid as a failure
            row.update(diverged=str(e), seconds=time.time() - t0)
            write_json(path, row)
            say(f"{run_key(variant, method, lr, seed)}: diverged")
            return row
        evals = [r for r in trained["metrics"] if "eval" in r]
        if self.s["full_eval"] == "chosen":  # kept until the method's learning rate is chosen
            adapter_io.save_adapter(model, self.adapter_dir(variant, method, lr, seed),
                                    {"init": init, "base_fingerprint": world["fingerprint"]})
        row.update(
            points=[{"step": r["step"], "disturbance": r["disturbance"], "scores": r["eval"]["scores"],
                     "items": {k: r["eval"]["items"][k] for k in ("kl", "tokens", "val_nll", "val_tokens")}}
                    for r in evals],
            final=evals[-1]["eval"], train_loss=sum(r["loss"] for r in trained["metrics"][-5:]) / 5,
            energy=captured_energies(layers, world["covariances"], self.inits[(variant, method, seed)]),
            seconds=time.time() - t0)
        write_json(path, row)
        say(f"{run_key(variant, method, lr, seed)}: val loss {row['final']['scores']['val_loss']:.3f}, "
            f"KL {row['final']['scores']['kl']:.4f} ({row['seconds']:.0f}s)")
        return row

    def adapter_dir(self, variant: str, method: str, lr: float, seed: int) -> Path:
        return self.out / "adapters" / run_key(variant, method, lr, seed)

    def full_evaluation(self, variant: str, method: str, lr: float, seed: int):
        """The full evaluation of a finished run, from its saved adapter, into its result file."""
        path = self.out / "runs" / f"{run_key(variant, method, lr, seed)}.json"
        row = read_json(path)
        if "final" not in row or "test_loss" in row["final"]["scores"]:
            return
        world = self.world(seed, variant)
        model = copy.deepcopy(world["base"])
        adapter_io.load_adapter(model, self.adapter_dir(variant, method, lr, seed))
        row["final"] = self.m.evaluate(model, world["tok"], world["probes"], world["ref"], full=True)
        write_json(path, row)
        say(f"{run_key(variant, method, lr, seed)}: full evaluation at the chosen lr")

    def start(self, world: dict, method: str, seed: int, model) -> dict:
        """Wrap the model's targets and start them from the method's init, computed once per
        (variant, method, seed) from that seed's calibration."""
        init, frozen = METHODS[method]
        key = (world["variant"], method, seed)
        return start_adapters(model, world["base"], self.inits, key, init, world["covariances"], self.rank,
                              self.alpha, frozen, seed)

    # --------------------------------------------------------------------------- worlds
    def train_settings(self, variant: str, seed: int) -> dict:
        s = self.s
        keys = {"preset": s["preset"], "seed": seed, "steps": s["steps"], "batch_size": s["batch_size"],
                "eval_every": s["eval_every"], "warmup": s["warmup"], "eval_examples": 16, "ckpt_every": s["steps"],
                "rank": self.rank, "alpha": self.alpha}
        if s["preset"] == "toy":
            keys.update(toy_overlap=variant, max_len=16)
        else:
            keys.update(calib_source=variant, calib_samples=s["calib_samples"], calib_len=s["calib_len"])
        return keys

    def world(self, seed: int, variant: str) -> dict:
        """Base model, data, probes, the base model's reference and the calibration of one
        (seed, variant), built once. SmolLM2's base, probes and reference serve every world."""
        key = (seed, variant)
        if key in self.worlds:
            return self.worlds[key]
        cfg = self.m.TrainConfig(**self.train_settings(variant, seed))
        toy = self.s["preset"] == "toy"
        sizes = self.s.get("sizes") or self.m.sizes
        if toy or self.shared is None:
            base, tok, data = self.m.load_model_and_data(cfg, log=lambda *a, **k: None)
            base.to(self.device).eval()
            probes = self.m.prepare_toy(tok, seed) if toy else self.m.prepare_real(tok, sizes)
            shared = {"base": base, "tok": tok, "probes": probes, "data": data,
                      "ref": self.m.reference(base, tok, probes, sizes["top_k"])}
            self.shared = None if toy else shared
            self.base_eval(shared, seed, variant)
        shared = shared if toy else self.shared
        data = copy.copy(shared["data"])
        data.heldout = shared["probes"].val  # the validation split: never trained on, and not the test split
        if not toy:  # the calibration text of this variant, sampled by this seed
            from loranull_mini import data as datasets
            texts = datasets.calibration_texts(variant, task_rows=datasets.asdiv("train"))
            data.calibration = datasets.calibration_windows(shared["tok"], texts, cfg.calib_samples, cfg.calib_len,
                                                            seed=seed)
        batches = [(data.calibration[i:i + 4], None if data.calibration_mask is None else data.calibration_mask[i:i + 4])
                   for i in range(0, len(data.calibration), 4)]
        covariances = calibration.calibrate_blockwise(shared["base"], batches, nullspace.ALL_TARGETS,
                                                      dtype=torch.float32, covariance_device="cpu")  # as train.py
        if seed == self.s["seeds"][0] and variant == next(iter(self.s["variants"])):
            diagnostics = self.out / "diagnostics.json"
            if not diagnostics.is_file():
                write_json(diagnostics, report.diagnostics(shared["base"], covariances))
        self.worlds[key] = {**shared, "data": data, "covariances": covariances, "variant": variant,
                            "fingerprint": adapter_io.base_fingerprint(shared["base"])}
        return self.worlds[key]

    def base_eval(self, shared: dict, seed: int, variant: str):
        """The base model's full evaluation (the zero point of every paired measurement)."""
        path = self.out / "base" / (f"{variant}-seed{seed}.json" if self.s["preset"] == "toy" else "shared.json")
        if not path.is_file():
            write_json(path, {"variant": variant, "seed": seed,
                              **self.m.evaluate(shared["base"], shared["tok"], shared["probes"], shared["ref"])})


_study = None  # a worker process's Study


def start_adapters(model, base, inits: dict, key, init: str, covariances, rank: int, alpha: float, frozen: bool,
                   seed: int) -> dict:
    """LoRA layers on `model` started from `init`, computed once per key on a copy of `base`
    (inits caches the factors), so every learning rate of a (method, seed) starts alike."""
    layers = lora.inject_lora(model, nullspace.ALL_TARGETS, rank, alpha, freeze_A=frozen, seed=seed)
    if key not in inits:
        fresh = nullspace.inject_adapters(copy.deepcopy(base), nullspace.ALL_TARGETS, rank, alpha, init=init,
                                          covariances=covariances, freeze_A=frozen, seed=seed)
        inits[key] = {name: {k: getattr(layer, k).detach().clone() for k in ("A", "B", "A0", "B0")
                             if getattr(layer, k) is not None} for name, layer in fresh.items()}
    for name, layer in layers.items():
        adapter_io.restore_layer(layer, {f"{name}.{k}": v for k, v in inits[key][name].items()}, name)
    lora.mark_only_lora_trainable(model)
    return layers


def _worker_start(settings, measure, out, device):
    global _study
    torch.set_num_threads(1)
    _study = Study(settings, measure, out, device)


def _worker_run(task):
    _study.run_method(*task)


def mean_final_loss(results: list[dict]) -> float:
    """Mean validation loss at the end over seeds; a diverged seed makes it infinite."""
    losses = [r["final"]["scores"]["val_loss"] if "final" in r else math.inf for r in results]
    return sum(losses) / len(losses)


def captured_energies(layers: dict, covariances: dict, start: dict) -> dict:
    """Mean over layers of trace(P_A C) / trace(C) for A at the init and after training."""
    init = [nullspace.captured_energy(start[name]["A"].cpu(), covariances[name].cpu()) for name in layers]
    final = [nullspace.captured_energy(layer.A.detach().cpu(), covariances[name].cpu()) for name, layer in layers.items()]
    return {"init": sum(init) / len(init), "final": sum(final) / len(final)}


def say(text: str):
    print(text, flush=True)
