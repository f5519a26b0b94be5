"""loranull_mini/exercises.py: every exercise's tests pass on the real code and fail on the
blanked copy; a copy with one exercise solved passes that exercise only; the errors of the
command line.

The checks run as a student runs them: `python -m loranull_mini.exercises check ...` in a
subprocess with one thread, inside the copy. Three test runs in all, side by side, once for
the module: the real code, the blanked copy, and the copy with exercise 2 solved (attention,
whose tests must not need exercise 1's rotary embeddings).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loranull_mini import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = [e.number for e in ex.EXERCISES]
SOLVED = 2  # the exercise solved in the one-solved copy


def start(*args, cwd=ROOT) -> subprocess.Popen:
    """`python -m loranull_mini.exercises ARGS` in `cwd`, one thread, started (not waited for)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "loranull_mini.exercises", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return finish(start(*args, cwd=cwd))


def verdicts(output: str) -> dict[int, str]:
    """{exercise: "pass" (all tests pass), "fail" (all fail) or "mixed"} from check's summary lines."""
    found = {}
    for m in re.finditer(r"^exercise (\d+): (?:all (\d+) tests pass|(\d+) of (\d+) tests fail)$", output, re.M):
        found[int(m[1])] = "pass" if m[2] else ("fail" if m[3] == m[4] else "mixed")
    return found


def outcome_lines(output: str) -> dict[str, str]:
    """{node id: "pass" | "FAIL" | ...} from check's per-test lines."""
    return {m[2]: m[1] for m in re.finditer(r"^  (pass|FAIL|SKIP|NOT RUN)\s+(\S+)$", output, re.M)}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """A blanked copy made by the command line, and one with exercise SOLVED solved."""
    student, solved = tmp_path_factory.mktemp("exercises") / "student", tmp_path_factory.mktemp("exercises") / "solved"
    for done in (run("make", student), run("make", solved), run("solve", SOLVED, "--dir", solved)):
        assert done.returncode == 0, done.stderr
    return student, solved


@pytest.fixture(scope="module")
def student(copies):
    return copies[0]


@pytest.fixture(scope="module")
def checks(copies):
    """`check all` on the real code, the blanked copy and the one-solved copy, run side by side."""
    student, solved = copies
    started = {"real": start("check", "all", "--dir", ROOT),
               "blank": start("check", "all", cwd=student),           # --dir defaults to the current directory
               "solved": start("check", "all", cwd=solved)}
    return {name: finish(process) for name, process in started.items()}


@pytest.fixture(scope="module")
def real_check(checks):
    return checks["real"]


@pytest.fixture(scope="module")
def blank_check(checks):
    return checks["blank"]


@pytest.fixture(scope="module")
def solved_check(copies, checks):
    return copies[1], checks["solved"]


# ----------------------------------------------------------------------------- every exercise
def test_check_exits_0_on_the_real_code_and_1_on_the_blanked_copy(real_check, blank_check):
    assert real_check.returncode == 0, real_check.stdout + real_check.stderr
    assert blank_check.returncode == 1, blank_check.stdout + blank_check.stderr


@pytest.mark.parametrize("number", NUMBERS)
def test_exercise_tests_pass_on_the_real_code_and_fail_on_the_blanked_copy(number, real_check, blank_check):
    exercise = ex.BY_NUMBER[number]
    assert verdicts(real_check.stdout)[number] == "pass"
    assert verdicts(blank_check.stdout)[number] == "fail"
    real, blank = outcome_lines(real_check.stdout), outcome_lines(blank_check.stdout)
    for node, hint in exercise.tests.items():
        assert real[node] == "pass", node
        assert blank[node] == "FAIL", node
        # the failure says what to do, and that the body is not written yet
        after = blank_check.stdout.split(f"FAIL  {node}\n", 1)[1].splitlines()
        assert after[0].strip() == f"hint:  {hint}"
        assert after[1].strip().startswith("error: NotImplementedError: not written yet (at ")


def test_a_copy_with_one_exercise_solved_passes_that_check_and_fails_the_others(solved_check):
    copy, done = solved_check
    assert done.returncode == 1
    assert verdicts(done.stdout) == {n: "pass" if n == SOLVED else "fail" for n in NUMBERS}, done.stdout
    # the solved bodies are the real ones; the others are still blank
    for region in ex.all_regions(copy):
        lines = (copy / region.file).read_text().splitlines()
        assert ex.is_blank(lines, region) == (region.number != SOLVED), region.key()


def outside_regions(root: Path, file: str) -> list[str]:
    """The lines of a core file with the bodies between the markers left out (markers kept)."""
    lines, kept, last = (root / file).read_text().splitlines(), [], 0
    for r in (r for r in ex.all_regions(root) if r.file == file):
        kept += lines[last:r.start + 1]
        last = r.end
    return kept + lines[last:]


def test_the_blanked_copy_differs_from_the_project_only_inside_the_markers(student):
    assert ex.project_files(student) == ex.project_files(ROOT)
    assert all(not (student / name).exists() and (ROOT / name).is_file() for name in ex.NOT_COPIED)
    for file in ex.CORE_FILES:
        assert outside_regions(student, file) == outside_regions(ROOT, file), file
        lines = (student / file).read_text().splitlines()
        for r in (r for r in ex.all_regions(student) if r.file == file):
            hint = ex.BY_NUMBER[r.number].functions[r.key()]
            body = lines[r.start + 1:r.end]
            assert " ".join(line.strip().lstrip("#").strip() for line in body[:-1]) == f"hint: {hint}"
            assert body[-1] == f'{r.indent}raise NotImplementedError("exercise {r.number}: {r.title} — {hint}")'
        compile("\n".join(lines), file, "exec")


# ----------------------------------------------------------------------------- the markers and the table
def test_every_function_of_the_table_holds_one_marked_region_with_its_solution():
    regions = ex.all_regions(ROOT)
    assert sorted(r.key() for r in regions) == sorted(k for e in ex.EXERCISES for k in e.functions)
    for r in regions:
        lines = (ROOT / r.file).read_text().splitlines()
        assert not ex.is_blank(lines, r) and r.end > r.start + 1, r.key()
    assert NUMBERS == list(range(1, len(NUMBERS) + 1)) and len(NUMBERS) >= 6


def test_broken_marker_pairs_are_clear_errors(tmp_path):
    opening = "# exercise 1: RMSNorm and rotary embeddings"
    cases = {
        "without its .# end exercise. line": f"def f():\n    {opening}\n    return 1\n",
        "does not close": f"def f():\n    {opening}\n    return 1\n    # end exercise 2\n",
        "outside a function": f"{opening}\nx = 1\n# end exercise 1\n",
    }
    for expected, source in cases.items():
        (tmp_path / "model.py").write_text(source)
        with pytest.raises(ex.ExerciseError, match=expected):
            ex.find_regions(tmp_path, "model.py")


# ----------------------------------------------------------------------------- the command line
def test_list_names_every_exercise_its_functions_and_tests():
    done = run("list")
    assert done.returncode == 0
    for e in ex.EXERCISES:
        assert f"{e.number}. {e.title}" in done.stdout
        for key in e.functions:
            assert key.split(":")[1] in done.stdout
        for node in e.tests:
            assert f"     {node}\n" in done.stdout


def test_bad_numbers_and_directories_are_clear_errors(tmp_path):
    for bad in ("9", "0", "one"):
        done = run("check", bad)
        assert done.returncode == 2 and f"no exercise '{bad}'" in done.stderr, done.stderr
    done = run("check", "1", "--dir", tmp_path / "missing")
    assert done.returncode == 1 and "is not a directory" in done.stderr
    done = run("check", "1", "--dir", tmp_path)
    assert done.returncode == 1 and "does not look like a copy of the project" in done.stderr
    (tmp_path / "note.txt").write_text("not empty")
    done = run("make", tmp_path)
    assert done.returncode == 1 and "is not an empty directory" in done.stderr
    with pytest.raises(ex.ExerciseError, match="inside the project"):
        ex.make(ROOT / "student-copy")
    assert not (ROOT / "student-copy").exists()


def test_solve_needs_a_copy_and_a_source_with_solutions(student, tmp_path):
    with pytest.raises(ex.ExerciseError, match="the project the solutions come from"):
        ex.solve([1], ROOT)
    ex.make(tmp_path / "copy")
    with pytest.raises(ex.ExerciseError, match="holds no solution"):
        ex.solve([1], tmp_path / "copy", source=student)
    with pytest.raises(ex.ExerciseError, match="is itself a student copy"):
        ex.make(tmp_path / "again", source=student)
