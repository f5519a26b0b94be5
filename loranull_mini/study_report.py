"""The report of a study of measured curves (loranull_mini/study.py), from its files only.

OUT/results.md    per method: the chosen learning rate, the matched retention cost (mean over
                  seeds, interval: the wider of the t-interval over seeds and the two-level
                  bootstrap, seeds then items), how many seeds were measured near the target;
                  the statements (Holm-corrected, yes / no / not shown); the same cost at three
                  other task losses (read after the runs, not used by the statements); the
                  end-of-run probes, a table per question; the pilot; the cost per phase
OUT/results.json  the same numbers
OUT/curves.png    retention cost against validation loss, linear axes: each seed a thin line
                  of its measured checkpoints, the mean bold, the base model a star (never
                  joined to a line), the target dashed

Reading the same files gives the same bytes (fixed bootstrap seeds, sorted keys): `eval.py
--suite real --report-only` rebuilds every table and figure.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from loranull_mini import stats
from loranull_mini.files import read_json, save_figure, write_text
from loranull_mini.report import LABELS as ADAPTER_LABELS
from loranull_mini.report import STATEMENTS as ADAPTER_STATEMENTS

LABELS = {**ADAPTER_LABELS, "full": "full fine-tuning", "null-v2-chat": "LoRA-Null v2, chat calibration"}
STATEMENTS = ADAPTER_STATEMENTS + [
    ("lora", "full", "LoRA forgets less than full fine-tuning"),
    ("null-v2", "full", "LoRA-Null v2 forgets less than full fine-tuning"),
    ("null-v2-chat", "null-v2", "LoRA-Null v2 calibrated on chat text forgets less than on plain NQ-open"),
]
N_BOOT = 1000
ALPHA = 0.05                     # the statements' family-wise level (Holm)
SENSITIVITY = (0.7, 0.2, -0.2)   # the matched cost also at target + these (nats), to see how it depends on the target


def load_runs(out: Path) -> list[dict]:
    return [read_json(p) for p in sorted((out / "runs").glob("*/*.json"))]


def seed_curve(run: dict, base: dict) -> dict:
    """One run's measured checkpoints as per-item sums, for stats.seed_costs."""
    pts = sorted(run["points"], key=lambda p: p["step"])
    return {"loss_sum": np.array([p["val_nll"] for p in pts], float),
            "loss_tokens": np.array(base["items"]["val_tokens"], float),
            "cost_sum": np.array([p["kl"] for p in pts], float),
            "cost_tokens": np.array(base["items"]["tokens"], float)}


def summarize(settings: dict, runs: list[dict], base: dict) -> dict:
    d, target = settings["definition"], settings["target"]
    methods, values, replicates = {}, {}, {}
    for m in d["methods"]:
        lr = settings["chosen"][m]
        mine = {r["seed"]: r for r in runs if r["method"] == m and r["lr"] == lr}
        seeds = [s for s in d["seeds"] if s in mine]
        if not seeds:
            continue
        ok = [s for s in seeds if "diverged" not in mine[s]]
        if len(ok) < len(seeds):
            v, rep = np.full(len(seeds), np.nan), None
        else:
            v, rep = stats.seed_costs([seed_curve(mine[s], base) for s in seeds], target, N_BOOT,
                                      np.random.default_rng(0))   # the same item draws for every method
        values[m], replicates[m] = v, rep
        elsewhere = {}
        for offset in SENSITIVITY:            # read after the runs; the statements use the target only
            w, w_rep = stats.seed_costs([seed_curve(mine[s], base) for s in ok], target + offset, N_BOOT,
                                        np.random.default_rng(0)) if len(ok) == len(seeds) else (v, None)
            elsewhere[f"{target + offset:.3f}"] = clean(stats.seed_interval(w, w_rep))
        end = [mine[s]["end"]["scores"] for s in ok]
        methods[m] = {"lr": lr, "seeds": seeds, "per_seed": [float(x) for x in v],
                      "measured": int(np.isfinite(v).sum()),
                      "matched": clean(stats.seed_interval(v, rep)), "elsewhere": elsewhere,
                      "end": {k: mean_sd([e[k] for e in end]) for k in (end[0] if end else {}) if e_num(end, k)},
                      "seconds": {k: float(np.mean([mine[s]["seconds"].get(k, 0.0) for s in ok]))
                                  for k in ("calibration", "init", "train", "checkpoints", "end_probes", "total")}}
    comparisons, listed = [], []
    for m, ref, text in STATEMENTS:
        if m not in values or ref not in values or len(values[m]) != len(values[ref]):
            continue
        rep = None if replicates[m] is None or replicates[ref] is None else replicates[m] - replicates[ref]
        comparisons.append({"d": values[m] - values[ref], "replicates": rep})
        listed.append((m, ref, text))
    verdicts = stats.holm_verdicts(comparisons, alpha=ALPHA)
    statements = [{"claim": text, "method": m, "reference": ref, "verdict": v,
                   **clean(stats.seed_interval(c["d"], c["replicates"]))}
                  for (m, ref, text), c, v in zip(listed, comparisons, verdicts)]
    return {"target": target, "base": base["scores"], "methods": methods, "statements": statements,
            "pilot": settings["pilot"], "chosen": settings["chosen"], "pilot_seconds": settings["pilot_seconds"],
            "n_runs": len(runs), "run_seconds": float(sum(r["seconds"].get("total", 0.0) for r in runs))}


def e_num(end: list[dict], key: str) -> bool:
    return all(isinstance(e.get(key), (int, float)) and e.get(key) is not None for e in end)


def clean(d: dict) -> dict:
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in d.items()}


def mean_sd(values) -> list:
    v = np.asarray(values, float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def write(out: Path, settings: dict) -> dict:
    out = Path(out)
    summary = summarize(settings, load_runs(out), read_json(out / "base.json"))
    write_text(out / "results.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    write_text(out / "results.md", markdown(settings, summary))
    plot_curves(out / "curves.png", settings, load_runs(out), read_json(out / "base.json"))
    return summary


def ci(d: dict, digits: int = 3) -> str:
    if d.get("value") is None:
        return "not measured near the target"
    if d.get("low") is None:
        return f"{d['value']:.{digits}g} (no interval)"
    return f"{d['value']:.{digits}g} [{d['low']:.{digits}g}, {d['high']:.{digits}g}]"


def markdown(settings: dict, s: dict) -> str:
    d = settings["definition"]
    parts = [f"# Study `{d['suite']}`", "",
             f"LoRA r={d['rank']}, alpha={d['alpha']:g} (full fine-tuning: every weight), {d['steps']} steps of batch "
             f"{d['batch_size']}, seeds {list(d['seeds'])}, checkpoints at steps {list(d['checkpoints'])}. Each "
             f"method's learning rate was chosen by a pilot ({d['pilot']['steps']} steps, seed {d['pilot']['seed']}, "
             f"scored on {d['sizes']['pilot_val']} validation problems the curves do not use); the target "
             f"validation loss {s['target']:.4f} nats (the base model's: {s['base']['val_loss']:.4f}) was fixed from "
             f"the pilot before any main run. Retention cost: per-token KL(base || tuned) on held-out Wikipedia, "
             f"interpolated between two measured checkpoints of the same seed. Interval: 95%, the wider of the "
             f"t-interval over seeds (n-1 df) and a two-level bootstrap (seeds, then items).", "",
             "## In short", "", *headline(s, d["sizes"]), "",
             "## Retention cost at the target task loss", "",
             "| method | lr | cost at the target | seeds measured near it | per seed |", "|---|---|---|---|---|"]
    for m, r in s["methods"].items():
        per = ", ".join("–" if not math.isfinite(x) else f"{x:.3g}" for x in r["per_seed"])
        parts.append(f"| {LABELS.get(m, m)} | {r['lr']:g} | {ci(r['matched'])} | {r['measured']}/{len(r['seeds'])}"
                     f" | {per} |")
    if s["statements"]:
        k = len(s["statements"])
        parts += ["", "## Statements (difference of matched costs, Holm-corrected over this list)", "",
                  f"Each interval is that statement's own 95% interval. The verdicts are Holm's step-down over "
                  f"these {k}: the i-th smallest p-value's interval is taken at level 1 - {ALPHA:g} / ({k} - i + 1) "
                  f"(the first at {100 * (1 - ALPHA / k):.4g}%), and the first that holds zero ends it, so an "
                  f"interval below that leaves out zero may still read not shown.", ""]
        parts += [f"- {st['claim']}: **{st['verdict']}** ({ci(st)})" for st in s["statements"]]
    losses = sorted({L for r in s["methods"].values() for L in r.get("elsewhere", {})}, key=float, reverse=True)
    if losses:
        parts += ["", "## The same cost at other task losses", "",
                  "Chosen after the runs, to show how the matched cost depends on where the target lies; "
                  "the statements above use the target fixed in advance only.", "",
                  "| method | " + " | ".join(f"val loss {L}" for L in losses) + " |", "|---|" + "---|" * len(losses)]
        parts += [f"| {LABELS.get(m, m)} | " + " | ".join(ci(r["elsewhere"][L]) if L in r["elsewhere"] else "–"
                                                           for L in losses) + " |" for m, r in s["methods"].items()]
    parts += ["", "## End of each run (mean ± sd over seeds)"] + end_tables(s)
    parts += ["", "## Pilot (loss on the pilot's validation items; chosen in bold)", ""]
    for m, grid in s["pilot"].items():
        cells = [(f"**{lr}: {v['pilot_loss']:.3f}**" if float(lr) == s["chosen"][m] else f"{lr}: {v['pilot_loss']:.3f}")
                 if v.get("pilot_loss") is not None else f"{lr}: diverged" for lr, v in
                 sorted(grid.items(), key=lambda kv: float(kv[0]))]
        parts.append(f"- {LABELS.get(m, m)}: " + ", ".join(cells))
    parts += ["", "## Cost per run (seconds, mean over seeds, measured)", "",
              "| method | calibration | init | train | checkpoints | end probes | total |", "|---|---|---|---|---|---|---|"]
    for m, r in s["methods"].items():
        sec = r["seconds"]
        parts.append(f"| {LABELS.get(m, m)} | " + " | ".join(f"{sec[k]:.1f}" for k in
                                                             ("calibration", "init", "train", "checkpoints",
                                                              "end_probes", "total")) + " |")
    parts += ["", f"{s['n_runs']} runs, {s['run_seconds'] / 60:.1f} min; pilot {s['pilot_seconds'] / 60:.1f} min."]
    return "\n".join(parts) + "\n"


END_TABLES = [  # (title, [(score, column)]): the end-of-run probes, a table per question
    ("Task, ASDiv: what was learnt (answer tokens that are digits against the others, the format)",
     [("val_loss", "val loss"), ("test_loss", "test loss"), ("test_digit_loss", "digit tokens"),
      ("test_other_loss", "other tokens"), ("test_acc", "greedy acc"), ("asdiv_numeric_acc", "gold number chosen")]),
    ("Knowledge kept: held-out Wikipedia and the base model's own chat answers (per-token KL(base || tuned))",
     [("kl", "Wikipedia KL"), ("ppl_change", "Wikipedia ppl change"), ("chat_kl", "chat KL")]),
    ("Standard benchmarks, scored as lm-eval-harness does (KL: of each item's option distribution)",
     [(f"{b}_{k}", f"{b.upper()} {k.replace('kl', 'KL')}") for b in ("piqa", "siqa", "obqa")
      for k in ("acc", "acc_norm", "kl")]),
    ("Closed-book knowledge: the gold option against others (NQ-open plain and chat-template, MMLU, TruthfulQA)",
     [(f"{c}_{k}", f"{name} {k.replace('kl', 'KL')}") for c, name in
      (("nq_plain", "NQ plain"), ("nq_chat", "NQ chat"), ("mmlu", "MMLU"), ("tqa", "TruthfulQA"))
      for k in ("acc", "kl")] + [("em", "NQ exact match")]),
]


def headline(s: dict, sizes: dict) -> list[str]:
    """One row per method: the matched cost with its interval, then the end probes a reader asks
    for first (mean over seeds); the README quotes these lines as they are."""
    def end(r, key, digits=3):
        return f"{r['end'][key][0]:.{digits}f}" if key in r["end"] else "–"
    lines = ["| method | seeds | Wikipedia KL at the target [95% CI] | PIQA / SIQA / OBQA acc_norm | chat KL "
             "| ASDiv test loss: digits / other |", "|---|---|---|---|---|---|"]
    rows = [("base model", "", "–", {"end": {k: [v] for k, v in s["base"].items() if v is not None}})]
    rows += [(LABELS.get(m, m), str(len(r["seeds"])), ci(r["matched"]), r) for m, r in s["methods"].items()]
    for label, seeds, cost, r in rows:
        lines.append(f"| {label} | {seeds} | {cost} | {end(r, 'piqa_acc_norm')} / {end(r, 'siqa_acc_norm')} / "
                     f"{end(r, 'obqa_acc_norm')} | {end(r, 'chat_kl')} | {end(r, 'test_digit_loss', 2)} / "
                     f"{end(r, 'test_other_loss', 2)} |")
    n = {k: sizes.get(k, "?") for k in ("wiki", "wiki_tokens", "piqa", "chat", "test")}
    return lines + ["", f"Wikipedia: {n['wiki']} passages of {n['wiki_tokens']} tokens; benchmarks: {n['piqa']} items "
                        f"each; chat: the base model's answers to {n['chat']} questions; ASDiv test: {n['test']} problems."]


def end_tables(s: dict) -> list[str]:
    """END_TABLES, base model first; a score in none of them goes to a last table, so none is lost."""
    present = {k for r in s["methods"].values() for k in r["end"]}
    listed = {k for _, cols in END_TABLES for k, _ in cols}
    rest = [(k, k) for k in sorted(present - listed)]
    lines = []
    for title, cols in END_TABLES + [("Other scores", rest)]:
        cols = [(k, name) for k, name in cols if k in present]
        if not cols:
            continue
        lines += ["", f"{title}:", "", "| method | " + " | ".join(name for _, name in cols) + " |",
                  "|---|" + "---|" * len(cols),
                  "| base model | " + " | ".join(fmt(s["base"].get(k)) for k, _ in cols) + " |"]
        for m, r in s["methods"].items():
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(
                "–" if k not in r["end"] else f"{fmt(r['end'][k][0])} ± {fmt(r['end'][k][1])}" for k, _ in cols) + " |")
    return lines


def fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def plot_curves(path: Path, settings: dict, runs: list[dict], base: dict):
    """One panel per method: each seed's measured points joined in step order (thin), the mean
    over seeds at each checkpoint (bold), the base model a star on its own, the target dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in settings["definition"]["methods"] if any(r["method"] == m for r in runs)]
    cols = min(4, max(1, len(methods)))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, m in zip(axes.flat, methods):
        mine = [r for r in runs if r["method"] == m and r["lr"] == settings["chosen"][m] and r.get("points")]
        for r in mine:
            pts = sorted(r["points"], key=lambda p: p["step"])
            ax.plot([p["val_loss"] for p in pts], [p["kl_mean"] for p in pts], "o-", lw=0.6, ms=2, alpha=0.6)
        steps = sorted({p["step"] for r in mine for p in r["points"]})
        mean = [(np.mean([p["val_loss"] for r in mine for p in r["points"] if p["step"] == s]),
                 np.mean([p["kl_mean"] for r in mine for p in r["points"] if p["step"] == s])) for s in steps]
        if mean:
            ax.plot(*zip(*mean), "-", color="k", lw=2, label="mean over seeds")
        ax.plot([base["scores"]["val_loss"]], [0.0], "*", color="k", ms=8, label="base model")
        ax.axvline(settings["target"], color="C3", ls="--", lw=0.8, label="target")
        ax.set_title(LABELS.get(m, m), fontsize=8), ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("validation task loss (nats/token)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("KL(base || tuned), wiki", fontsize=7)
    save_figure(fig, path)
