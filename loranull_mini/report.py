"""The report of a study (loranull_mini/suite.py): tables, the matched-loss comparison, plots.

OUT/results.md    the headline (retention at the matched task loss, with bootstrap intervals,
                  and each method's difference from LoRA and from LoRA-FA), the plain list of
                  what the data supports, the full tables at each method's best learning rate,
                  the learning-rate grid, the captured energy
OUT/results.json  every number of the tables (no per-item lists)
OUT/*.png         curves (retention cost against task loss), forest (the differences),
                  effective rank and spectra of the calibration activations, energy, disturbance

Effective rank (the paper's premise: activations have a lower effective rank than the
weights, hence a larger, cleaner null space) is computed here from the covariances.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import nullspace
from loranull_mini import stats
from loranull_mini.files import read_json, save_figure, write_json, write_text

LABELS = {"base": "base model", "lora": "LoRA", "pissa": "PiSSA", "milora": "MiLoRA", "corda": "CorDA-KPA",
          "null": "LoRA-Null v1", "null-v2": "LoRA-Null v2", "lora-fa": "LoRA-FA (A frozen, random)",
          "top-fa": "top-space A, frozen", "space": "space only (A trained)", "space-fa": "space only, A frozen"}
# (key, column title, scale, decimals) of the full tables
REAL_COLUMNS = [("kl", "wiki KL (nats/token)", 1, 4), ("ppl_change", "wiki ppl change %", 100, 2),
                ("nq_plain_kl", "NQ plain option KL", 1, 4), ("nq_chat_kl", "NQ chat option KL", 1, 4),
                ("nq_plain_acc", "NQ plain contr. acc %", 100, 1), ("nq_chat_acc", "NQ chat contr. acc %", 100, 1),
                ("mmlu_kl", "MMLU option KL", 1, 4), ("mmlu_acc", "MMLU acc %", 100, 1),
                ("tqa_kl", "TruthfulQA option KL", 1, 4), ("tqa_acc", "TruthfulQA acc %", 100, 1),
                ("em", "NQ EM %", 100, 1), ("test_loss", "ASDiv test loss", 1, 3), ("test_acc", "ASDiv acc %", 100, 1)]
TOY_COLUMNS = [("kl", "held-out fact KL", 1, 4), ("em", "held-out fact acc %", 100, 1),
               ("test_loss", "skill test loss", 1, 3), ("test_acc", "skill test acc %", 100, 1)]
STATEMENTS = [  # (method, reference, what a lower cost of `method` would show)
    ("null-v2", "lora", "LoRA-Null v2 forgets less than LoRA"),
    ("null-v2", "lora-fa", "LoRA-Null v2 forgets less than LoRA-FA (the same frozen A, at random): where A points"),
    ("space-fa", "top-fa", "a frozen A in the null space forgets less than one in the most used directions"),
    ("null-v2", "space-fa", "moving W's null-space part into the adapter (LoRA-Null v2) forgets less than the "
                            "same frozen space alone"),
    ("lora-fa", "lora", "freezing a random A (LoRA-FA) forgets less than LoRA"),
    ("null", "lora", "LoRA-Null v1 (A trained) forgets less than LoRA"),
    ("corda", "lora", "CorDA-KPA forgets less than LoRA"),
    ("pissa", "lora", "PiSSA forgets less than LoRA"),
    ("milora", "lora", "MiLoRA forgets less than LoRA"),
]


def jsonable(obj):
    return json.loads(json.dumps(obj, default=float))


def write(out: Path, settings: dict, results: list[dict], methods: dict) -> dict:
    """Tables, statements and plots of every variant of a study, from the runs' results."""
    base = {p.stem: read_json(p) for p in sorted((out / "base").glob("*.json"))}
    toy = settings["preset"] == "toy"
    summary = {"settings": jsonable(settings), "variants": {}}
    for variant, names in settings["variants"].items():
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        summary["variants"][variant] = summarize(variant, names, runs, base, settings, toy)
    diag = read_json(out / "diagnostics.json", missing_ok=True)
    summary["diagnostics"] = diag
    write_json(out / "results.json", summary)
    write_text(out / "results.md", markdown(summary, toy))
    plots(out, summary, results, base, settings)
    return summary


def base_of(base: dict, variant: str, seed: int) -> dict:
    """The base model's evaluation for a run: per world on the toy, one for SmolLM2."""
    return base.get(f"{variant}-seed{seed}") or base["shared"]


def summarize(variant: str, names, runs: list[dict], base: dict, settings: dict, toy: bool) -> dict:
    seeds = settings["seeds"]
    grid, chosen, rows, curves = {}, {}, {}, {}
    for m in names:
        mine = [r for r in runs if r["method"] == m]
        lrs = sorted({r["lr"] for r in mine})
        grid[m] = {f"{lr:g}": mean_or_inf([final(r, "val_loss") for r in mine if r["lr"] == lr]) for lr in lrs}
        best = stats.best_lr({lr: grid[m][f"{lr:g}"] for lr in lrs})
        if best is None:
            continue
        chosen[m] = best
        picked = [r for r in mine if r["lr"] == chosen[m] and "final" in r]
        rows[m] = {k: mean_std([r["final"]["scores"][k] for r in picked]) for k in picked[0]["final"]["scores"]}
        rows[m]["energy_init"] = mean_std([r["energy"]["init"] for r in picked])
        rows[m]["energy_final"] = mean_std([r["energy"]["final"] for r in picked])
        rows[m]["n_seeds"] = len(picked)
        curves[m] = [curve([r for r in mine if r["seed"] == s and "points" in r], base_of(base, variant, s))
                     for s in seeds if any(r["seed"] == s for r in mine)]
    b = base_of(base, variant, seeds[0])["scores"]
    matched = stats.matched_costs(curves, settings["target"]) if curves else {}
    diffs = {m: {ref: jsonable_ci(stats.difference(matched[m], matched[ref]))
                 for ref in ("lora", "lora-fa") if ref in matched and ref != m} for m in matched}
    statements = [statement(m, ref, text, matched) for m, ref, text in STATEMENTS if m in matched and ref in matched]
    return {"grid": grid, "chosen": chosen, "table": rows, "base": b, "target": settings["target"],
            "matched": {m: jsonable_ci(v) for m, v in matched.items()}, "differences": diffs,
            "statements": statements, "n_runs": len(runs), "diverged": sum("diverged" in r for r in runs),
            "train_seconds": sum(r.get("seconds", 0) for r in runs)}


def curve(runs: list[dict], base: dict) -> dict:
    """One seed's points for stats.matched_costs: the base model, then every evaluated
    checkpoint of every learning rate."""
    items = base["items"]
    points = [(items["val_nll"], [0.0] * len(items["kl"]))] + [(p["items"]["val_nll"], p["items"]["kl"])
                                                               for r in runs for p in r["points"]]
    return {"loss_sum": np.array([p[0] for p in points]), "loss_tokens": np.array(items["val_tokens"], float),
            "cost_sum": np.array([p[1] for p in points]), "cost_tokens": np.array(items["tokens"], float)}


def statement(method: str, ref: str, text: str, matched: dict) -> dict:
    d = stats.difference(matched[method], matched[ref])
    if d["reached"] < 0.95:
        verdict = "not measurable: the target loss was not reached in every resample"
    elif d["high"] < 0:
        verdict = "yes"
    elif d["low"] > 0:
        verdict = "no, it forgets more"
    else:
        verdict = "not shown: the interval includes 0"
    return {"claim": text, "method": method, "reference": ref, "verdict": verdict, **jsonable_ci(d)}


def jsonable_ci(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if k != "replicates"}


def final(run: dict, key: str) -> float:
    return run["final"]["scores"][key] if "final" in run else math.inf


def mean_or_inf(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else math.inf


def mean_std(values) -> list[float]:
    v = np.asarray(values, float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


# ----------------------------------------------------------------------------- markdown
def ci(d: dict, scale: float = 1.0, decimals: int = 4) -> str:
    if not math.isfinite(d.get("value", math.nan)):
        return "not reached"
    return f"{scale * d['value']:.{decimals}f} [{scale * d['low']:.{decimals}f}, {scale * d['high']:.{decimals}f}]"


def markdown(summary: dict, toy: bool) -> str:
    s = summary["settings"]
    parts = [f"# Study `{s['suite']}`", "",
             f"Every method: LoRA r={s['rank']}, alpha={s['alpha']:g}, {s['steps']} steps of batch {s['batch_size']}, "
             f"seeds {list(s['seeds'])}, learning rates {list(s['lrs'])} "
             + (f"(extended by factors of 2, at most {s['max_extensions']} times, while the best mean validation "
                f"loss was at an edge)" if s["max_extensions"] else "(a fixed grid, not extended)")
             + f", evaluated every {s['eval_every']} steps. Retention cost: "
             f"{'KL of the held-out facts answers' if toy else 'per-token KL(base || tuned) on held-out Wikipedia'}"
             f" against the base model. Intervals: 95% percentile bootstrap over seeds and items."]
    if toy and len(summary["variants"]) > 1:
        parts += side_by_side(summary["variants"])
    for variant, v in summary["variants"].items():
        cols = TOY_COLUMNS if toy else REAL_COLUMNS
        parts += ["", f"## {'overlap' if toy else 'calibration'}: {variant}", "",
                  f"### Retention cost at the matched task loss (validation loss {v['target']:g} nats; "
                  f"the base model's is {v['base']['val_loss']:.3f})", "",
                  "| method | cost at the matched loss | minus LoRA | minus LoRA-FA |", "|---|---|---|---|"]
        for m, c in v["matched"].items():
            d = v["differences"].get(m, {})
            parts.append(f"| {LABELS.get(m, m)} | {ci(c)} | {ci(d['lora']) if 'lora' in d else '–'} | "
                         f"{ci(d['lora-fa']) if 'lora-fa' in d else '–'} |")
        if v["statements"]:
            parts += ["", "What this variant supports (the difference at the matched loss, 95% interval):", ""]
            parts += [f"- {st['claim']}: **{st['verdict']}** ({ci(st)})" for st in v["statements"]]
        parts += ["", "### Full tables at each method's best learning rate (mean ± std over seeds)", "",
                  "| method | lr | " + " | ".join(c[1] for c in cols) + " | val loss | energy A init → final |",
                  "|---|---|" + "---|" * (len(cols) + 2)]
        parts.append(f"| base model | – | " + " | ".join(fmt(v["base"].get(k), sc, dec) for k, _, sc, dec in cols)
                     + f" | {v['base']['val_loss']:.3f} | – |")
        for m, row in v["table"].items():
            parts.append(f"| {LABELS.get(m, m)} | {v['chosen'][m]:g} | "
                         + " | ".join(fmt_ms(row.get(k), sc, dec) for k, _, sc, dec in cols)
                         + f" | {fmt_ms(row['val_loss'], 1, 3)} | {row['energy_init'][0]:.1e} → "
                           f"{row['energy_final'][0]:.1e} |")
        lrs = sorted({float(lr) for g in v["grid"].values() for lr in g})
        parts += ["", "### Learning-rate grid (mean validation loss at the end; chosen in bold)", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for m, g in v["grid"].items():
            cells = []
            for lr in lrs:
                val = g.get(f"{lr:g}")
                text = "–" if val is None else ("diverged" if not math.isfinite(val) else f"{val:.3f}")
                cells.append(f"**{text}**" if m in v["chosen"] and lr == v["chosen"][m] else text)
            parts.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        parts += ["", f"{v['n_runs']} runs ({v['diverged']} diverged), {v['train_seconds'] / 60:.1f} min of "
                      f"training and evaluation."]
    return "\n".join(parts) + "\n"


def side_by_side(variants: dict) -> list[str]:
    """Every world's matched cost in one table, a method per row ("–": not run in that world)."""
    methods = list(dict.fromkeys(m for v in variants.values() for m in v["matched"]))
    lines = ["", "## The worlds side by side", "",
             "Retention cost at the matched task loss (lower forgets less; 95% bootstrap interval over seeds "
             "and items; \"–\": not run in that world):", "",
             "| method | " + " | ".join(f"{w}: cost at matched loss" for w in variants) + " |",
             "|---|" + "---|" * len(variants)]
    for m in methods:
        cells = [matched_cell(v["matched"].get(m)) for v in variants.values()]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def matched_cell(c: dict | None) -> str:
    """One matched cost, saying how often the target was reached when not (nearly) always."""
    if c is None:
        return "–"
    if math.isfinite(c["value"]):
        text = f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
        return text if c["reached"] >= 0.95 else f"{text} (target reached in {c['reached']:.0%} of resamples)"
    if math.isfinite(c["low"]):
        return (f"not reached by every seed (resamples that reach it: [{c['low']:.3f}, {c['high']:.3f}], "
                f"{c['reached']:.0%})")
    return "not reached"


def fmt(value, scale, decimals) -> str:
    return "–" if value is None else f"{scale * value:.{decimals}f}"


def fmt_ms(ms, scale, decimals) -> str:
    return "–" if ms is None else f"{scale * ms[0]:.{decimals}f} ± {scale * ms[1]:.{decimals}f}"


# ----------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def diagnostics(model, covariances: dict) -> dict:
    """Per block: effective rank (entropy erank, n90, n99) of each distinct layer input
    (from its covariance) and of each weight; eigenvalue spectra of three blocks."""
    n_layers = len(model.layers)
    show = sorted({0, n_layers // 2, n_layers - 1})
    seen, acts, weights, spectra = set(), [], [], {}
    for name, C in covariances.items():
        block, proj = int(name.split(".")[1]), name.split(".")[-1]
        W = model.get_submodule(name).weight
        weights.append({"block": block, "proj": proj, **nullspace.effective_rank(nullspace.weight_singular_values(W))})
        if id(C) in seen:
            continue
        seen.add(id(C))
        sv = nullspace.activation_singular_values(C)
        acts.append({"block": block, "input_of": proj, "dim": C.shape[0], **nullspace.effective_rank(sv)})
        if block in show:
            spectra[f"{block}.{proj}"] = (sv ** 2 / (sv ** 2).max()).tolist()
    return {"activations": acts, "weights": weights, "spectra": spectra}


# ----------------------------------------------------------------------------- plots
def plots(out: Path, summary: dict, results: list[dict], base: dict, settings: dict):
    import matplotlib
    matplotlib.use("Agg")
    for variant, v in summary["variants"].items():
        runs = [r for r in results if r["variant"] == variant]
        plot_curves(out / f"curves-{variant}.png", variant, v, runs, base, settings)
        plot_forest(out / f"forest-{variant}.png", variant, v)
        plot_energy(out / f"energy-{variant}.png", v)
        plot_disturbance(out / f"disturbance-{variant}.png", v, runs)
    if summary.get("diagnostics"):
        plot_effective_rank(out / "effective_rank.png", summary["diagnostics"])
        plot_spectra(out / "spectra.png", summary["diagnostics"])


def plot_curves(path, variant, v, runs, base, settings):
    """Retention cost against the task-loss drop: every evaluated point faint, each seed's
    frontier as a line, the matched loss as a vertical line."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    b = v["base"]["val_loss"]
    for i, m in enumerate(v["table"]):
        color = f"C{i % 10}"
        for j, s in enumerate(settings["seeds"]):
            pts = [(p["scores"]["val_loss"], p["scores"]["kl"]) for r in runs
                   if r["method"] == m and r["seed"] == s and "points" in r for p in r["points"]]
            if not pts:
                continue
            ax.scatter([b - x for x, _ in pts], [y for _, y in pts], s=6, color=color, alpha=0.25)
            xs, ys = stats.frontier([x for x, _ in pts] + [b], [y for _, y in pts] + [0.0])
            ax.plot(b - xs, np.maximum(ys, 1e-6), color=color, lw=1, label=LABELS.get(m, m) if j == 0 else None)
    ax.axvline(b - v["target"], color="k", ls="--", lw=0.8, label="matched loss")
    ax.set_yscale("log"), ax.set_xlabel("validation task-loss drop (nats/token)")
    ax.set_ylabel("retention cost: KL(base || tuned) per token"), ax.grid(alpha=0.3), ax.legend(fontsize=6)
    ax.set_title(f"trade-off curves ({variant}); lines: each seed's frontier", fontsize=9)
    save_figure(fig, path)


def plot_forest(path, variant, v):
    """Each method's difference from LoRA and from LoRA-FA at the matched loss, 95% intervals."""
    import matplotlib.pyplot as plt
    methods = [m for m in v["differences"] if v["differences"][m]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(methods) + 1.5), sharey=True, squeeze=False)
    for ax, ref in zip(axes[0], ("lora", "lora-fa")):
        for y, m in enumerate(methods):
            d = v["differences"][m].get(ref)
            if d and math.isfinite(d["value"]):
                ax.errorbar(d["value"], y, xerr=[[d["value"] - d["low"]], [d["high"] - d["value"]]], fmt="o",
                            color="C0", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"minus {LABELS[ref]}", fontsize=9), ax.grid(alpha=0.3)
        ax.set_xlabel("difference of retention cost at the matched loss")
    axes[0][0].set_yticks(range(len(methods)), [LABELS.get(m, m) for m in methods], fontsize=7)
    fig.suptitle(f"{variant}: below 0 = forgets less (95% bootstrap interval)", fontsize=9)
    save_figure(fig, path)


def plot_energy(path, v):
    import matplotlib.pyplot as plt
    methods = list(v["table"])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(methods))
    ax.bar(x - 0.2, [v["table"][m]["energy_init"][0] for m in methods], 0.4, label="at init")
    ax.bar(x + 0.2, [v["table"][m]["energy_final"][0] for m in methods], 0.4, label="after training")
    ax.set_xticks(x, [LABELS.get(m, m) for m in methods], fontsize=6, rotation=30, ha="right")
    ax.set_yscale("log"), ax.set_ylabel("trace(P_A C) / trace(C)"), ax.legend()
    ax.set_title("share of calibration energy in A's row space (mean over layers)", fontsize=9)
    save_figure(fig, path)


def plot_disturbance(path, v, runs):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, m in enumerate(v["table"]):
        picked = [r for r in runs if r["method"] == m and r["lr"] == v["chosen"][m] and "points" in r]
        steps = sorted({p["step"] for r in picked for p in r["points"]})
        values = [np.mean([p["disturbance"] for r in picked for p in r["points"] if p["step"] == s]) for s in steps]
        ax.plot(steps, np.maximum(values, 1e-8), "o-", color=f"C{i % 10}", label=LABELS.get(m, m))
    ax.set_xlabel("step"), ax.set_ylabel("||dW X|| / ||W X|| on calibration inputs")
    ax.set_yscale("log"), ax.legend(fontsize=6), ax.grid(alpha=0.3)
    ax.set_title("knowledge disturbance at the chosen lr (mean over layers and seeds)", fontsize=9)
    save_figure(fig, path)


SHORT = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w_gate": "gate", "w_up": "up", "w_down": "down"}
INPUT_NAME = {"wq": "q/k/v", "wo": "o", "w_gate": "gate/up", "w_down": "down"}


def plot_effective_rank(path, diag):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "erank", "entropy effective rank"), (axes[1], "n90", "components with 90% energy")):
        for i, inp in enumerate(sorted({a["input_of"] for a in diag["activations"]})):
            pts = sorted((a["block"], a[key]) for a in diag["activations"] if a["input_of"] == inp)
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"input of {INPUT_NAME.get(inp, inp)}")
        for i, proj in enumerate(sorted({w["proj"] for w in diag["weights"]})):
            pts = sorted((w["block"], w[key]) for w in diag["weights"] if w["proj"] == proj)
            ax.plot(*zip(*pts), "x--", color=f"C{i + 4}", alpha=0.6, label=f"weight {SHORT.get(proj, proj)}")
        ax.set_xlabel("block"), ax.set_ylabel(title), ax.set_yscale("log"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("effective rank: calibration activations (o) vs weights (x)", fontsize=9)
    save_figure(fig, path)


def plot_spectra(path, diag):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ev in diag["spectra"].items():
        ax.semilogy(range(1, len(ev) + 1), [max(e, 1e-16) for e in ev], label=f"block {name}")
    ax.set_xlabel("eigenvalue index (descending)"), ax.set_ylabel("eigenvalue of C / largest")
    ax.set_title("calibration covariance spectra", fontsize=9), ax.legend(fontsize=6), ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_run(path: Path, rows: list[dict], title: str):
    """One training run: training and held-out loss, and the knowledge disturbance, by step."""
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
    save_figure(fig, path)
