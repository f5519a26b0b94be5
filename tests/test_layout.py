"""The layout a reader relies on: imports run one way, from the scripts down to the ideas.

    train.py, eval.py                      the scripts (top)
    loranull_mini/*                        machinery: calibration, suites, reports, run state, I/O
    nullspace.py -> lora.py -> model.py    the ideas (bottom; model.py imports nothing of ours)

Every import is read from the source (also those inside functions), so a cycle broken by a
late import still counts.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "eval"}
IDEAS = ["model", "lora", "nullspace"]  # bottom to top


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    modules.update({f"loranull_mini.{p.stem}": p for p in (ROOT / "loranull_mini").glob("*.py")
                    if p.stem != "__init__"})
    return modules


def imports_of(path: Path, modules) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_there_is_no_import_cycle():
    graph = import_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_imports_run_from_the_scripts_down_to_the_ideas():
    graph = import_graph()
    assert graph["model"] == set(), graph["model"]
    assert graph["lora"] <= {"model"}, graph["lora"]
    assert graph["nullspace"] <= {"model", "lora"}, graph["nullspace"]
    for name, imported in graph.items():
        if name.startswith("loranull_mini."):
            assert not imported & SCRIPTS, f"{name} imports the script(s) {imported & SCRIPTS}"


def test_the_walk_sees_imports_inside_functions():
    # the check above is only worth something if late imports are seen
    source = "def f():\n    import lora\n    from loranull_mini import files\n"
    path = ROOT / "tests" / "_layout_probe.py"
    try:
        path.write_text(source)
        assert imports_of(path, project_modules()) == {"lora", "loranull_mini.files"}
    finally:
        path.unlink()


# ----------------------------------------------------------------------------- one pipeline
INIT_HOMES = {"lora", "nullspace"}  # where an initialisation's mathematics may be written
INIT_LIKE = ("_init", "_factors", "null_basis", "init_layers", "check_init_inputs", "check_weight")


def module_functions(path: Path) -> list[str]:
    return [node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_second_implementation_of_an_init_outside_lora_and_nullspace():
    """Inits, null bases and their factor formulas are defined in lora.py and nullspace.py only;
    the machinery calls them (loranull_mini/fastbasis.py supplies a basis function, passed in)."""
    for name, path in project_modules().items():
        if name in INIT_HOMES:
            continue
        defined = [f for f in module_functions(path) if f.endswith(INIT_LIKE) and f != "smallest_eigenvectors"]
        assert not defined, f"{path.name} defines {defined}: an init belongs in lora.py or nullspace.py"


def test_layers_are_initialised_only_from_an_init_or_a_saved_adapter():
    """LoRALinear.initialize is called by lora.py and nullspace.py (the inits), adapter_io (a saved
    adapter's factors) and the benchmark (lora.pissa_init's randomized variant), nowhere else."""
    allowed = INIT_HOMES | {"loranull_mini.adapter_io", "loranull_mini.bench"}
    for name, path in project_modules().items():
        calls = [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "initialize"]
        assert not calls or name in allowed, f"{path.name} initialises layers itself (line {calls[0].lineno})"


CORE_LINES = {"model.py": 410, "lora.py": 345, "nullspace.py": 370, "train.py": 525, "eval.py": 300}


def test_the_five_core_files_stay_readable_in_one_sitting():
    for name, cap in CORE_LINES.items():
        lines = len((ROOT / name).read_text(encoding="utf-8").splitlines())
        assert lines <= cap, f"{name} has {lines} lines, over its {cap}: move plumbing into loranull_mini/"
