"""The study of measured curves (loranull_mini/study.py): the matched value between two measured
checkpoints (never from the base model), the seed-level interval's coverage, Holm's verdicts,
settings fixed before the main runs, and `--suite real` at a tiny size end to end."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
import train
from loranull_mini import stats, study, study_report, suite
from model import ModelConfig, Transformer

COMMITTED = Path(__file__).parent / "data" / "study-tiny"


# ----------------------------------------------------------------------------- statistics
def test_matched_cost_refuses_the_base_model_and_interpolates_between_two_measured_points():
    with pytest.raises(ValueError, match="base model"):
        stats.matched_cost([0, 1, 2], [4.0, 3.0, 2.0], [0.0, 0.1, 0.5], target=3.5)
    # checkpoints (step, loss, cost): 1 (3.0, 0.1), 2 (2.0, 0.5), 4 (1.0, 2.0), given out of order
    steps, losses, costs = [4, 1, 2], [1.0, 3.0, 2.0], [2.0, 0.1, 0.5]
    assert stats.matched_cost(steps, losses, costs, 2.5) == pytest.approx(0.3)      # halfway from 0.1 to 0.5
    assert stats.matched_cost(steps, losses, costs, 1.25) == pytest.approx(1.625)   # 3/4 of the way 0.5 -> 2.0
    assert stats.matched_cost(steps, losses, costs, 3.0) == pytest.approx(0.1)
    assert math.isnan(stats.matched_cost(steps, losses, costs, 3.5))    # only base -> step 1 would bracket it
    assert math.isnan(stats.matched_cost(steps, losses, costs, 0.5))    # never reached
    # the vectorised form used by the bootstrap agrees, column by column
    got = stats._matched_cost_rows(np.array([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]),
                                   np.array([[0.1, 0.1], [0.5, 0.5], [2.0, 2.0]]), 2.5)
    assert got == pytest.approx([0.3, 0.3])


def test_t_quantile_matches_tabulated_values():
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_quantile(0.995, 2) == pytest.approx(9.925, abs=2e-3)
    assert stats.t_pvalue(4.303, 2) == pytest.approx(0.05, abs=1e-3)


def test_seed_interval_covers_a_known_mean_in_at_least_93_percent_of_1000_studies_with_3_seeds():
    rng = np.random.default_rng(0)
    covered, widths_t = 0, []
    for _ in range(1000):
        seed_effects = 0.5 + rng.normal(0, 0.2, 3)                     # the true mean over seeds is 0.5
        items = seed_effects[:, None] + rng.normal(0, 0.3, (3, 40))    # 40 items per seed
        replicates = np.stack([rng.choice(row, (200, 40)).mean(1) for row in items])   # (S, B) item resamples
        ci = stats.seed_interval(items.mean(1), replicates)
        covered += ci["low"] <= 0.5 <= ci["high"]
        widths_t.append(ci["t_high"] - ci["t_low"])
        assert ci["high"] - ci["low"] >= max(ci["t_high"] - ci["t_low"], ci["boot_high"] - ci["boot_low"]) - 1e-12
    assert covered / 1000 >= 0.93, covered
    # seeds are the unit: a 2-level bootstrap alone (no t) would be far narrower with 3 seeds
    assert np.mean(widths_t) > 0.5


def test_holm_says_yes_no_and_not_shown_in_step_down_order():
    clear_less = {"d": np.array([-1.0, -1.1, -0.9, -1.05]), "replicates": None}
    clear_more = {"d": np.array([1.0, 1.1, 0.9, 1.05]), "replicates": None}
    noise = {"d": np.array([0.3, -0.4, 0.1, -0.2]), "replicates": None}
    assert stats.holm_verdicts([clear_less, noise, clear_more]) == ["yes", "not shown", "no"]
    # p = 0.04 passes alone at 0.05 but not as one of three statements (0.05 / 3)
    borderline = {"d": np.array([-1.0, -0.2, -0.6, -0.95]), "replicates": None}
    p = stats.seed_interval(borderline["d"])["p"]
    assert 0.0167 < p < 0.05, p
    assert stats.holm_verdicts([borderline]) == ["yes"]
    assert stats.holm_verdicts([borderline, noise, noise]) == ["not shown"] * 3
    assert stats.holm_verdicts([{"d": np.array([math.nan, -1.0, -1.0]), "replicates": None}]) == ["not shown"]


# ----------------------------------------------------------------------------- the study end to end
TINY = dict(preset="real", methods=("lora", "full"), seeds=(0, 1), steps=6, batch_size=4, warmup=3,
            checkpoints=(1, 2, 3, 4, 5, 6), neighbours=0, rank=4, alpha=8.0, calib_source="nq-open",
            calib_samples=4, calib_len=32,
            sizes={"wiki": 6, "wiki_tokens": 64, "nq": 4, "nq_em": 2, "mmlu": 4, "tqa": 4, "val": 8, "pilot_val": 8,
                   "test": 4, "test_acc": 2, "top_k": 16},
            pilot=dict(seed=0, steps=3, lrs={"default": (1e-2, 2e-2, 4e-2, 8e-2), "full": (1e-3, 2e-3, 4e-3, 8e-3)},
                       max_extensions=0))


def tiny_load_model_and_data(cfg, log=print):
    """SmolLM2's tokenizer and the real data, with a toy-shaped random model."""
    from loranull_mini.checkpoint import load_model
    _, tok = load_model(None, require_tokenizer=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=512))
    return model.eval(), tok, real_data(cfg, tok)


def real_data(cfg, tok):
    from loranull_mini import data as datasets
    rows = datasets.asdiv("train")[:64]
    texts = datasets.calibration_texts(cfg.calib_source)
    return train.Data([datasets.encode_qa(tok, r["question"], r["answer"]) for r in rows], [],
                      datasets.calibration_windows(tok, texts, cfg.calib_samples, cfg.calib_len))


def run_tiny(monkeypatch, out: Path, **changes):
    monkeypatch.setitem(study.SUITES, "real", {**TINY, **changes})
    monkeypatch.setattr(train, "load_model_and_data", tiny_load_model_and_data)
    return ev.main(["--suite", "real", "--out", str(out)])


def test_tiny_real_study_runs_end_to_end_with_a_measured_bracket_for_every_method(tmp_path, monkeypatch):
    out = tmp_path / "real"
    order = []
    main_run = study.Study.main_run

    def watched(self, method, lr, seed, settings):      # the settings file exists before any main run
        fixed = json.loads((out / "settings.json").read_text())
        order.append((method, fixed["chosen"][method] == lr, "target" in fixed))
        return main_run(self, method, lr, seed, settings)
    monkeypatch.setattr(study.Study, "main_run", watched)
    merges, pilot_scores = [], study.Study.pilot_scores
    monkeypatch.setattr(study, "merged", lambda m, merged=study.merged: merges.append(None) or merged(m))

    def counted(self, method, lr):                      # a pilot merges once, after its last step
        before = len(merges)
        result = pilot_scores(self, method, lr)
        assert len(merges) - before == (0 if "diverged" in result else 1), (method, lr)
        return result
    monkeypatch.setattr(study.Study, "pilot_scores", counted)
    summary = run_tiny(monkeypatch, out)
    assert order and all(same and target for _, same, target in order)
    settings = json.loads((out / "settings.json").read_text())
    for m in TINY["methods"]:
        assert len(settings["pilot"][m]) >= 4                                   # a factor-2 grid of >= 4
        lrs = sorted(float(lr) for lr in settings["pilot"][m])
        assert all(b == pytest.approx(2 * a) for a, b in zip(lrs, lrs[1:]))
        r = summary["methods"][m]
        assert r["measured"] == 2 and r["matched"]["value"] is not None, (m, r)  # a measured bracket, every seed
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").glob("*/*.json"))
    assert len(runs) == 4
    for p in (out / "runs").glob("*/*.json"):
        row = json.loads(p.read_text())
        assert p.stat().st_size < 60_000 and [q["step"] for q in row["points"]] == list(TINY["checkpoints"])
        assert set(row["seconds"]) >= {"calibration", "init", "train", "checkpoints", "end_probes", "total"}
    assert "full fine-tuning" in (out / "results.md").read_text()
    # report-only reproduces every table and the figure bit for bit
    before = {n: (out / n).read_bytes() for n in ("results.md", "results.json", "curves.png")}
    ev.main(["--suite", "real", "--out", str(out), "--report-only"])
    assert {n: (out / n).read_bytes() for n in before} == before
    if not COMMITTED.is_dir():                          # the committed tiny study is made by this test once
        shutil.copytree(out, COMMITTED, ignore=shutil.ignore_patterns("*.png"))
    # resuming runs nothing again; a changed definition, or an edited settings file, is refused
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*.json")}
    run_tiny(monkeypatch, out)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match="another definition"):
        run_tiny(monkeypatch, out, steps=7)
    settings["target"] += 0.1
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="settings changed"):
        run_tiny(monkeypatch, out)


def test_report_only_on_the_committed_tiny_study_reproduces_its_committed_tables(tmp_path):
    out = tmp_path / "study"
    shutil.copytree(COMMITTED, out)
    for name in ("results.md", "results.json"):
        (out / name).unlink()
    settings = json.loads((out / "settings.json").read_text())
    study_report.write(out, settings)
    for name in ("results.md", "results.json"):
        assert (out / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_the_cost_at_other_losses_is_the_matched_cost_moved_to_them(monkeypatch):
    """At offset 0 it is the matched cost itself; at another loss, another number."""
    settings = json.loads((COMMITTED / "settings.json").read_text())
    runs, base = study_report.load_runs(COMMITTED), json.loads((COMMITTED / "base.json").read_text())
    monkeypatch.setattr(study_report, "SENSITIVITY", (0.0, 0.05))
    summary = study_report.summarize(settings, runs, base)
    at, near = f"{settings['target']:.3f}", f"{settings['target'] + 0.05:.3f}"
    for r in summary["methods"].values():
        assert r["elsewhere"][at] == r["matched"] and r["elsewhere"][near]["value"] not in (None, r["matched"]["value"])


def test_the_end_of_run_tables_show_every_score_once_under_its_question():
    listed = [k for _, cols in study_report.END_TABLES for k, _ in cols]
    scores = {k: [1.0, 0.5] for k in listed[::3] + ["a_new_score"]}
    s = {"base": {k: 0.0 for k in scores}, "methods": {"lora": {"end": scores}, "null-v2": {"end": {}}}}
    lines = study_report.end_tables(s)
    headers = [c.strip() for line in lines if line.startswith("| method |") for c in line.split("|")[2:-1]]
    names = dict(kv for _, cols in study_report.END_TABLES for kv in cols)
    assert sorted(headers) == sorted(names.get(k, k) for k in scores)        # each score once, none lost
    assert "Other scores:" in lines and "| LoRA-Null v2 | – |" in lines       # a method without the score


def test_toy_suite_is_still_the_grid_study():
    assert "toy" in suite.SUITES and "toy" not in study.SUITES
