"""The README's counts are checked, not typed: its length, its test count, its table of inits."""
import re
import subprocess
import sys
from pathlib import Path

import nullspace

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_fits_in_250_lines():
    assert len(README.splitlines()) <= 250


def test_the_readme_states_the_number_of_tests_pytest_collects():
    stated = re.search(r"runs everything on the CPU \((\d+) tests\)", README)
    assert stated, "the README's Tests section must state the test count"
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600).stdout
    collected = re.search(r"(\d+) tests? collected", out)
    assert collected, out[-2000:]
    assert int(stated.group(1)) == int(collected.group(1))


def test_the_methods_table_lists_every_init():
    table = README[README.index("## The methods"):README.index("## Where this implementation")]
    rows = re.findall(r"^\| `([a-z]+)[` ]", table, flags=re.M)
    assert set(rows) == set(nullspace.INITS), (rows, list(nullspace.INITS))


def test_the_real_study_table_is_the_committed_reports_own():
    """The README's SmolLM2 table is quoted from docs/results/real/results.md, line for line,
    with the run count that report states."""
    report = (ROOT / "docs" / "results" / "real" / "results.md").read_text(encoding="utf-8")
    head = "| method | seeds | Wikipedia KL at the target"
    rows = README[README.index(head):].split("\n\n")[0].splitlines()
    theirs = report[report.index(head):].split("\n\n")[0].splitlines()
    assert len(rows) > 3 and rows == theirs
    runs = re.search(r"^(\d+) runs, ", report, flags=re.M).group(1)
    assert f"{runs} of its 30 runs" in README
