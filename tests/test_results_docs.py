"""The committed grid-study reports are the code's rendering of their results.json, and the
docs that quote them quote them: no number of docs/RESULTS.md's toy section or of the README's
toy paragraph is typed by hand."""
import json
import re
from pathlib import Path

import pytest

from loranull_mini import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


@pytest.mark.parametrize("study, toy", [("toy", True), ("real-quick", False), ("real-calibration", False)])
def test_a_committed_report_is_the_rendering_of_its_results_json(study, toy):
    summary = json.loads((RESULTS / study / "results.json").read_text(encoding="utf-8"))
    assert report.markdown(summary, toy) == (RESULTS / study / "results.md").read_text(encoding="utf-8")


def test_the_side_by_side_table_marks_what_was_not_run_and_what_was_not_always_reached():
    c = {"value": 0.2156, "low": 0.0143, "high": 0.5309, "reached": 0.863}
    variants = {"random": {"matched": {"lora": dict(c, reached=1.0), "pissa": c}},
                "top": {"matched": {"lora": {"value": float("nan"), "low": 0.054, "high": 0.915, "reached": 0.645}}}}
    lines = report.side_by_side(variants)
    assert lines[-2] == "| LoRA | 0.216 [0.014, 0.531] | not reached by every seed (resamples that reach it: " \
                        "[0.054, 0.915], 64%) |"
    assert lines[-1] == "| PiSSA | 0.216 [0.014, 0.531] (target reached in 86% of resamples) | – |"
    assert report.matched_cell({"value": float("nan"), "low": float("nan"), "high": float("nan"),
                                "reached": 0.0}) == "not reached"


def blocks(text: str) -> list[str]:
    """The tables and bullet lists of a markdown text, each as one string."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith(("|", "- ")):
            current.append(line)
        elif current:
            found.append("\n".join(current))
            current = []
    return found


def test_the_toy_section_of_docs_results_quotes_the_committed_toy_report():
    doc = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    section = doc[doc.index("### Toy world"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    toy = (RESULTS / "toy" / "results.md").read_text(encoding="utf-8")
    quoted = blocks(section)
    assert len(quoted) >= 4
    for block in quoted:
        assert block in toy, block


def triples(intervals) -> set:
    """(value, low, high) of each interval, to the three decimals the docs quote."""
    return {(round(d["value"], 3), round(d["low"], 3), round(d["high"], 3)) for d in intervals}


def test_the_readmes_toy_paragraph_quotes_the_committed_toy_statements():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("**The toy world**")
    paragraph = readme[start:readme.index("\n\n", start)]
    summary = json.loads((RESULTS / "toy" / "results.json").read_text(encoding="utf-8"))
    world = re.search(r"\(3 seeds, [^,]+, in the (\w+) world", paragraph).group(1)
    said = triples(summary["variants"][world]["statements"]
                   + [d["lora"] for d in summary["variants"][world]["differences"].values() if "lora" in d])
    number = r"([+-]?\d+\.\d{3})"
    quoted = re.findall(rf"\({number} \[{number}, {number}\][),]", paragraph)
    assert len(quoted) >= 5
    for triple in quoted:
        assert tuple(float(x) for x in triple) in said, triple
    single = re.findall(rf"\(({number[1:-1]})\)", paragraph)
    values = {round(s["value"], 3) for s in summary["variants"][world]["statements"]}
    for value in single:
        assert float(value) in values, value


def test_the_toy_numbers_of_docs_results_evidence_summary_are_the_committed_toy_statements():
    doc = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    summary_text = doc[doc.index("## Does LoRA-Null forget less?"):doc.index("### SmolLM2-135M-Instruct")]
    summary = json.loads((RESULTS / "toy" / "results.json").read_text(encoding="utf-8"))
    said = triples(s for v in summary["variants"].values() for s in v["statements"])
    number = r"([+-]?\d+\.\d{3})(?!\d)"                  # the toy's three decimals (SmolLM2's have four)
    quoted = re.findall(rf"{number}\s+\[{number}, {number}\]", summary_text)
    assert len(quoted) >= 8
    for triple in quoted:
        assert tuple(float(x) for x in triple) in said, triple


def test_the_bench_table_of_docs_results_is_the_committed_runs_own():
    """docs/RESULTS.md's table against transformers + PEFT is bench.table of the committed run,
    and its header names that run's date, versions and duration."""
    from loranull_mini import bench
    run = json.loads((RESULTS / "bench" / "cpu.json").read_text(encoding="utf-8"))
    doc = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Performance against transformers + PEFT"):]
    assert bench.table(run["rows"]) in section
    env = run["environment"]
    for fact in (env["date"], f"torch {env['torch']}", f"transformers {env['transformers']}",
                 f"peft {env['peft']}", f"{env['seconds'] / 60:.1f} minutes"):
        assert fact in section.split("\n\n")[1], fact


def test_report_only_rebuilds_the_committed_toy_report_from_its_runs_bit_for_bit(tmp_path):
    """docs/results/toy holds every run's results file: --report-only rebuilds results.md and
    results.json from them byte for byte."""
    import shutil

    import eval as ev
    out = tmp_path / "toy"
    shutil.copytree(RESULTS / "toy", out)
    (out / "results.md").unlink()
    (out / "results.json").unlink()
    ev.main(["--suite", "toy", "--out", str(out), "--report-only"])
    for name in ("results.md", "results.json"):
        assert (out / name).read_bytes() == (RESULTS / "toy" / name).read_bytes(), name
