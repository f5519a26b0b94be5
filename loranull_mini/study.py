"""A study of measured curves, seeds as the unit: python eval.py --suite real | real-long

1. Settings first. A pilot per method (a factor-2 grid of learning rates, pilot_steps steps of
   the main schedule on the pilot seed, scored on ASDiv validation items the curves do not
   use) picks each method's learning rate; the target task loss is then fixed from the pilot:
   the highest validation loss any method has at its chosen rate after pilot_steps, so every
   method crosses it mid-run. All of it is written to OUT/settings.json before any main run;
   a resumed study whose definition, or whose settings file, differs from what its runs were
   made under is refused.
2. Main runs: every method x seed (x the chosen rate and, in real-long, its factor-2
   neighbours), evaluated on merged weights at log-spaced checkpoints with the cheap probes
   (retention KL and validation loss, per item) and with eval.py's full probe set at the end.
   The base model's reference distributions are computed once per study, each seed's
   calibration once per calibration source, each init once per (method, seed).
3. Each finished run writes OUT/runs/<method>/lr<lr>-seed<seed>.json (compact, per item, with
   its cost per phase in seconds); a run whose file exists is skipped, so a study can be done
   in pieces, on any machine, through the repository. The report (study_report.py) reads only
   those files: `--report-only` rebuilds it bit for bit.

Full fine-tuning ("full") trains every weight with the same loop, data, loss and schedule.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch

import lora
import nullspace
from loranull_mini import calibration, metrics, stats, study_report
from loranull_mini import data as datasets
from loranull_mini.devices import pick_device
from loranull_mini.files import read_json, write_text
from loranull_mini.suite import METHODS as ADAPTER_METHODS, start_adapters

METHODS = {**ADAPTER_METHODS, "full": ("full", False), "null-v2-chat": ("null", True)}  # label -> (init, A frozen)
CALIBRATION = {"null-v2-chat": "chat"}        # methods calibrated on another text than the study's
REAL_METHODS = ("lora", "null-v2", "null", "pissa", "milora", "corda", "full", "lora-fa", "space-fa",  # run in
                "null-v2-chat")                                                           # this order
LORA_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
PILOT_LRS = {"default": LORA_LRS, "pissa": (2.5e-4, 5e-4, 1e-3, 2e-3), "milora": (5e-4, 1e-3, 2e-3, 4e-3),
             "full": (1.25e-5, 2.5e-5, 5e-5, 1e-4)}
# Per run on 2 idle CPU cores (measured, docs/results/STUDY.md): a training step of batch 8 ~5 s,
# the cheap probes (64 passages x 64 tokens, 48 validation problems) ~20 s per checkpoint, the
# full probe set ~130 s once at the end: ~7.5 min a run, 30 runs, so a study takes sittings.
REAL_SIZES = {"wiki": 64, "wiki_tokens": 64, "nq": 48, "nq_em": 16, "mmlu": 32, "tqa": 32, "val": 48,
              "pilot_val": 48, "test": 64, "test_acc": 16, "top_k": 256, "piqa": 64, "siqa": 64, "obqa": 64,
              "chat": 32, "chat_tokens": 48}
SUITES = {
    "real": dict(preset="real", methods=REAL_METHODS, seeds=(0, 1, 2), steps=32, batch_size=8, warmup=2,
                 checkpoints=(1, 2, 4, 8, 16, 32), neighbours=0, rank=8, alpha=16.0, calib_source="nq-open",
                 calib_samples=16, calib_len=128, sizes=REAL_SIZES,
                 pilot=dict(seed=0, steps=4, lrs=PILOT_LRS, max_extensions=1)),
    "real-long": dict(preset="real", methods=REAL_METHODS, seeds=(0, 1, 2, 3, 4), steps=240, batch_size=8,
                      warmup=10, checkpoints=(1, 2, 4, 8, 16, 32, 64, 128, 240), neighbours=1, rank=8, alpha=16.0,
                      calib_source="nq-open", calib_samples=32, calib_len=256,
                      sizes={**REAL_SIZES, "wiki": 200, "nq": 200, "nq_em": 64, "mmlu": 100, "tqa": 100,
                             "test": 150, "test_acc": 64, "top_k": 512, "piqa": 500, "siqa": 500, "obqa": 500},
                      pilot=dict(seed=0, steps=40, lrs=PILOT_LRS, max_extensions=1)),
}


class _PilotDone(Exception):
    """Raised from the evaluation hook to end a pilot run after its last step."""


class _OutOfTime(Exception):
    """Raised before a pilot run once the time given to the study is spent."""


def run(name: str, measure, *, out: str = "", device: str = "auto", report_only: bool = False,
        until: float | None = None) -> dict:
    """Fix the settings, run every main run not yet done (none is started after time.time() passes
    `until`), and write the report of what is there."""
    out = Path(out or f"docs/results/{name}")
    definition = jsonable({"suite": name, **SUITES[name]})
    if report_only:
        return study_report.write(out, read_json(out / "settings.json"))
    study = Study(definition, measure, out, device, until)
    try:
        settings = study.fix_settings()
    except _OutOfTime:
        say("the time given is spent during the pilot (its finished runs are kept): run the same command again")
        return {"runs_total": None, "runs_done": 0, "finished": False, "stopped_in": "pilot"}
    study.check_runs(settings)
    order = run_order(definition, settings)
    for method, lr, seed in order:
        if until is not None and time.time() > until:
            say("the time given is spent: run the same command again to go on")
            break
        study.main_run(method, lr, seed, settings)
    done = sum(run_path(out, m, lr, seed).is_file() for m, lr, seed in order)
    summary = study_report.write(out, settings) if done else {}
    return {**summary, "runs_total": len(order), "runs_done": done, "finished": done == len(order)}


def run_order(definition: dict, settings: dict) -> list[tuple[str, float, int]]:
    """The main runs, methods two by two, each pair's seeds interleaved (lora s0, null-v2 s0, lora s1,
    ...): a study stopped part-way has whole paired comparisons, the headline pair first."""
    methods = list(definition["methods"])
    return [(m, lr, seed) for i in range(0, len(methods), 2) for seed in definition["seeds"]
            for m in methods[i:i + 2] for lr in settings["lrs"][m]]


def jsonable(obj):
    return json.loads(json.dumps(obj, default=float))


def compact(obj, digits: int = 7):
    """Floats to `digits` significant digits (a few tens of KB per run file)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: compact(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compact(v, digits) for v in obj]
    return obj


def write_compact(path: Path, obj):
    write_text(path, json.dumps(compact(obj), separators=(",", ":"), sort_keys=True) + "\n")


def settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_path(out: Path, method: str, lr: float, seed: int) -> Path:
    return out / "runs" / method / f"lr{lr:g}-seed{seed}.json"


class Study:
    def __init__(self, definition: dict, measure, out: Path, device: str, until: float | None = None):
        self.s, self.m, self.out, self.until = definition, measure, out, until
        self.device, self.autocast = pick_device(device)
        self.shared, self.covariances, self.inits = None, {}, {}

    # --------------------------------------------------------------------------- settings
    def fix_settings(self) -> dict:
        """The settings file: the definition, the pilot, each method's learning rates, the target.
        Written once, before any main run; a study folder with another definition is refused."""
        path = self.out / "settings.json"
        old = read_json(path, missing_ok=True)
        if old is not None:
            if old.get("definition") != self.s:
                raise ValueError(f"{path} holds a study with another definition: choose another --out")
            return old
        t0 = time.time()
        pilot = {m: self.pilot(m) for m in self.s["methods"]}
        chosen = {m: stats.best_lr({float(lr): v["pilot_loss"] for lr, v in p.items()}) for m, p in pilot.items()}
        missing = [m for m, lr in chosen.items() if lr is None]
        if missing:
            raise ValueError(f"every pilot learning rate diverged for {missing}: widen the pilot grid")
        k = self.s["neighbours"]
        lrs = {m: [lr * 2.0 ** i for i in range(-k, k + 1)] for m, lr in chosen.items()}
        target = max(pilot[m][f"{chosen[m]:g}"]["val_loss"] for m in chosen)
        settings = {"definition": self.s, "pilot": pilot, "chosen": chosen, "lrs": lrs, "target": target,
                    "pilot_seconds": time.time() - t0}
        write_compact(path, settings)
        return read_json(path)                         # as every later sitting reads it

    def check_runs(self, settings: dict):
        """Every finished run was made under this settings file (an edited target or learning rate is refused)."""
        sha = settings_sha(settings)
        for p in sorted((self.out / "runs").glob("*/*.json")):
            if read_json(p).get("settings_sha") != sha:
                raise ValueError(f"{p} was made under other settings than {self.out / 'settings.json'}: "
                                 f"the study's settings changed; choose another --out")

    def pilot(self, method: str) -> dict:
        """{lr: {"pilot_loss", "val_loss"}} after pilot.steps steps, the grid extended while its best is at an edge."""
        p, grid, results = self.s["pilot"], list(p_lrs(self.s, method)), {}
        extensions = p["max_extensions"]
        while True:
            for lr in grid:
                if f"{lr:g}" not in results:
                    results[f"{lr:g}"] = self.pilot_run(method, lr)
            best = stats.best_lr({float(k): v["pilot_loss"] for k, v in results.items()})
            ordered = sorted(float(k) for k in results)
            if best is None or extensions == 0 or best not in (ordered[0], ordered[-1]):
                return results
            grid.append(ordered[0] / 2 if best == ordered[0] else ordered[-1] * 2)
            extensions -= 1

    def pilot_run(self, method: str, lr: float) -> dict:
        """One pilot run's task losses, kept in OUT/pilot/ so that a stopped pilot resumes."""
        path = self.out / "pilot" / f"{method}-lr{lr:g}.json"
        done = read_json(path, missing_ok=True)
        if done is None or done.get("definition_sha") != settings_sha(self.s):
            if self.until is not None and time.time() > self.until:
                raise _OutOfTime
            write_compact(path, {"definition_sha": settings_sha(self.s), "scores": self.pilot_scores(method, lr)})
            done = read_json(path)
        return {k: math.inf if v is None else v for k, v in done["scores"].items()}  # a diverged run's inf

    def pilot_scores(self, method: str, lr: float) -> dict:
        world = self.world()
        n = self.s["pilot"]["steps"]
        scores = {}

        def at_checkpoint(model, step):            # the task losses only: a pilot measures no retention
            nll, tokens = metrics.answer_nll(model, world["pilot_items"])
            val_nll, val_tokens = metrics.answer_nll(model, world["probes"].val)
            scores.update(pilot_loss=sum(nll) / sum(tokens), val_loss=sum(val_nll) / sum(val_tokens))
            raise _PilotDone
        try:
            self.train(method, lr, self.s["pilot"]["seed"], {n}, at_checkpoint, seconds={})
        except _PilotDone:
            pass
        except FloatingPointError as e:
            return {"pilot_loss": math.inf, "val_loss": math.inf, "diverged": str(e)}
        say(f"pilot {method} lr {lr:g}: pilot loss {scores['pilot_loss']:.3f}, val loss {scores['val_loss']:.3f}")
        return scores

    # --------------------------------------------------------------------------- one main run
    def main_run(self, method: str, lr: float, seed: int, settings: dict):
        path = run_path(self.out, method, lr, seed)
        if path.is_file():
            return
        t0 = time.time()
        world = self.world()
        seconds = {"checkpoints": 0.0}
        points = []
        checkpoints = set(self.s["checkpoints"])

        def at_checkpoint(model, step):
            t = time.time()
            e = self.m.evaluate(model, world["tok"], world["probes"], world["ref"], full=False)
            points.append({"step": step, "val_nll": e["items"]["val_nll"], "kl": e["items"]["kl"],
                           "dnll": e["items"]["dnll"], "val_loss": e["scores"]["val_loss"],
                           "kl_mean": e["scores"]["kl"]})
            seconds["checkpoints"] += time.time() - t
        row = {"method": method, "lr": lr, "seed": seed, "settings_sha": settings_sha(settings)}
        try:
            model, train_loss = self.train(method, lr, seed, checkpoints, at_checkpoint, seconds)
        except FloatingPointError as e:
            write_compact(path, {**row, "diverged": str(e), "points": points, "seconds": {"total": time.time() - t0}})
            say(f"{method} lr {lr:g} seed {seed}: diverged")
            return
        t = time.time()
        end = self.m.evaluate(merged(model), world["tok"], world["probes"], world["ref"], full=True)
        seconds["end_probes"] = time.time() - t
        seconds["total"] = time.time() - t0
        write_compact(path, {**row, "points": points, "end": {"scores": end["scores"], "items": end["items"]},
                             "train_loss": train_loss, "seconds": seconds})
        say(f"{method} lr {lr:g} seed {seed}: val loss {points[-1]['val_loss']:.3f}, KL {points[-1]['kl_mean']:.4f} "
            f"({seconds['total']:.0f}s)")

    def train(self, method: str, lr: float, seed: int, checkpoints: set, at_checkpoint, seconds: dict):
        """Train one run with train.finetune; at_checkpoint(merged model, step) after each step in
        checkpoints (the merged copy is made there only).
        Returns (the trained model, the training loss per step)."""
        world = self.world()
        init, frozen = METHODS[method]
        cfg = self.m.TrainConfig(preset="real", seed=seed, steps=self.s["steps"], batch_size=self.s["batch_size"],
                                 warmup=self.s["warmup"], eval_every=1, eval_examples=4, ckpt_every=self.s["steps"],
                                 rank=self.s["rank"], alpha=self.s["alpha"], init=init, freeze_a=frozen, lr=lr)
        model = copy.deepcopy(world["base"])
        t = time.time()
        covariances = {} if init == "full" else self.calibration(CALIBRATION.get(method, self.s["calib_source"]), seed)
        seconds["calibration"] = time.time() - t
        t = time.time()
        layers = {} if init == "full" else self.start(method, seed, model, covariances)
        for p in model.parameters() if init == "full" else ():
            p.requires_grad_(True)                     # full fine-tuning: every weight
        seconds["init"] = time.time() - t
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
        calls = []

        def evaluate(m):                               # called at step 0, then after every step
            calls.append(None)
            if len(calls) - 1 in checkpoints:
                at_checkpoint(merged(m), len(calls) - 1)
            return {}
        t = time.time()
        result = self.m.finetune(cfg, model, layers, optimizer, world["data"], world["tok"].pad_id, covariances,
                                 self.device, self.autocast, log=lambda *a, **k: None, evaluate=evaluate,
                                 progress=False)
        seconds["train"] = time.time() - t - seconds.get("checkpoints", 0.0)
        return model, [r["loss"] for r in result["metrics"]]

    def start(self, method: str, seed: int, model, covariances: dict) -> dict:
        """Wrap the model's targets and start them from the method's init, computed once per (method, seed)."""
        init, frozen = METHODS[method]
        key = (method, seed)
        return start_adapters(model, self.world()["base"], self.inits, key, init, covariances, self.s["rank"],
                              self.s["alpha"], frozen, seed)

    # --------------------------------------------------------------------------- shared state
    def world(self) -> dict:
        """Base model, data, probes and the base model's reference: once per study (and sitting)."""
        if self.shared is not None:
            return self.shared
        cfg = self.m.TrainConfig(preset="real", calib_samples=self.s["calib_samples"], calib_len=self.s["calib_len"])
        base, tok, data = self.m.load_model_and_data(cfg, log=lambda *a, **k: None)
        base.to(self.device).eval()
        sizes = self.s["sizes"]
        probes = self.m.prepare_real(tok, sizes)
        val = datasets.asdiv("val")
        pilot_items = [datasets.encode_qa(tok, r["question"], r["answer"])
                       for r in val[sizes["val"]:sizes["val"] + sizes["pilot_val"]]]  # never in the curves
        data = copy.copy(data)
        data.heldout = pilot_items
        self.shared = {"base": base, "tok": tok, "probes": probes, "data": data, "pilot_items": pilot_items,
                       "ref": self.m.reference(base, tok, probes, sizes["top_k"])}
        path = self.out / "base.json"
        if not path.is_file():
            t = time.time()
            e = self.m.evaluate(base, tok, probes, self.shared["ref"], full=True)
            write_compact(path, {"scores": e["scores"], "items": e["items"], "seconds": time.time() - t})
        return self.shared

    def calibration(self, source: str, seed: int) -> dict:
        """The covariances of one calibration text, sampled by the seed: once per (source, seed)."""
        key = (source, seed)
        if key not in self.covariances:
            world = self.world()
            n, length = self.s["calib_samples"], self.s["calib_len"]
            if source == "chat":
                windows = metrics.chat_calibration_windows(world["base"], world["tok"], n, length, seed)
            else:
                texts = datasets.calibration_texts(source, task_rows=datasets.asdiv("train"))
                windows = datasets.calibration_windows(world["tok"], texts, n, length, seed=seed)
            batches = [(windows[i:i + 4], None) for i in range(0, len(windows), 4)]
            self.covariances = {k: v for k, v in self.covariances.items() if k[1] == seed}  # older seeds are done
            self.covariances[key] = calibration.calibrate_blockwise(world["base"], batches, nullspace.ALL_TARGETS,
                                                                    dtype=torch.float32, covariance_device="cpu")
            self.inits = {k: v for k, v in self.inits.items() if k[1] == seed}
        return self.covariances[key]


def p_lrs(settings: dict, method: str):
    lrs = settings["pilot"]["lrs"]
    return lrs.get(method) or lrs.get(METHODS[method][0]) or lrs["default"]


def merged(model):
    """A copy of the model with every adapter folded into its weight (what a user would deploy)."""
    if not lora.lora_layers(model):
        return model
    copy_ = copy.deepcopy(model)
    lora.merge_lora(copy_)
    return copy_


def say(text: str):
    print(text, flush=True)
