"""docs/TUTORIAL.md says what the code does: every quoted line is in the function it names,
in order; its exercise table is exercises.py's; its numbers and figures come from the toy
model through loranull_mini/tutorial_figures.py."""
import re
from pathlib import Path

import pytest
import torch

from loranull_mini import exercises as ex
from loranull_mini import tutorial_figures as figures

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = (ROOT / "docs" / "TUTORIAL.md").read_text(encoding="utf-8")


def quoted_blocks() -> list[tuple[str, str, list[str]]]:
    """(file, function, lines) of every ```python block that opens with `# FILE: FUNCTION`."""
    blocks = []
    for body in re.findall(r"```python\n(.*?)```", TUTORIAL, re.S):
        first, *lines = body.splitlines()
        m = re.fullmatch(r"# (\S+\.py): (\S+)", first)
        assert m, f"a quoted block must open with '# file.py: function', not {first!r}"
        blocks.append((m[1], m[2], lines))
    return blocks


def normalised(line: str) -> tuple[str, str]:
    """(the whole line, the code without its trailing comment), whitespace runs made single."""
    code = re.split(r"\s{2,}#|^#", line.strip())[0]
    return " ".join(line.split()), " ".join(code.split())


def test_every_quoted_line_is_in_the_function_it_names_in_order():
    blocks = quoted_blocks()
    assert len(blocks) >= 20
    for file, function, lines in blocks:
        source = (ROOT / file).read_text(encoding="utf-8")
        spans = {name: (first, last) for name, first, last in ex.function_spans(source)}
        assert function in spans, f"{file} has no function {function}"
        first, last = spans[function]
        body = [normalised(line) for line in source.splitlines()[first - 1:last]]
        at = 0
        for line in (line for line in lines if line.strip() not in ("", "...")):
            whole, code = normalised(line)
            found = [i for i in range(at, len(body)) if whole == body[i][0] or (whole == code == body[i][1])]
            assert found, f"{file}: {function}: not found (in this order): {line.strip()!r}"
            at = found[0] + 1


def test_the_exercise_table_is_that_of_exercises_py():
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \|", TUTORIAL, re.M)
    assert [(int(n), title) for n, title in rows] == [(e.number, e.title) for e in ex.EXERCISES]
    for command in ("exercises list", "exercises make /tmp/student", "exercises check 1", "exercises solve 1"):
        assert f"python -m loranull_mini.{command}" in TUTORIAL


@pytest.fixture(scope="module")
def toy():
    return figures.toy_covariances(seed=0)


def test_the_quoted_energies_are_the_toy_models_and_loranull_reads_the_least_possible(toy):
    model, covariances = toy
    C = covariances[figures.ENERGY_LAYER]
    energies = figures.captured_energies(model.get_submodule(figures.ENERGY_LAYER).weight.detach(), C, 8, 16.0)
    quoted = dict(re.findall(r"^\| (\w+) \| (\d\.\de-\d\d) \|$", TUTORIAL, re.M))
    assert quoted == {method: f"{value:.1e}" for method, value in energies.items()}
    least, largest = figures.energy_bounds(C, 8)
    assert energies["null"] == pytest.approx(least, rel=1e-6)
    assert all(least <= e <= largest * (1 + 1e-9) for e in energies.values())
    assert min(energies, key=energies.get) == "null"
    # the spectrum's caption: the down projection's inputs span 289 of its 384 directions
    down = covariances["layers.1.feed_forward.w_down"]
    eigenvalues = torch.linalg.eigvalsh(down)
    zero = int((eigenvalues <= 1e-16 * eigenvalues[-1]).sum())
    assert f"span {384 - zero} of 384 directions" in TUTORIAL
    assert f"its 8 directions still\ncarry {least:.1e} of the energy" in TUTORIAL


def test_the_figures_come_from_the_named_command_and_stay_small(tmp_path):
    assert "`python -m loranull_mini.tutorial_figures`" in TUTORIAL
    written = figures.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in written) == ["energy.png", "spectrum.png"]
    for path in written:
        shipped = ROOT / "docs" / "tutorial" / path.name
        assert f"](tutorial/{path.name})" in TUTORIAL
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < path.stat().st_size < 150_000 and shipped.stat().st_size < 150_000
