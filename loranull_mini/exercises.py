'''Exercises made from the real code: blank a function body, write it again, check it.

    python -m loranull_mini.exercises list                         # exercises, functions, tests
    python -m loranull_mini.exercises make /tmp/student            # a copy with every exercise blanked
    cd /tmp/student && python -m loranull_mini.exercises check 1   # exercise 1's tests, on that copy
    python -m loranull_mini.exercises solve 1 --dir /tmp/student   # the reference body back (from here)

The core files (model.py, lora.py, nullspace.py) mark each exercise with a pair of comments
around a function body; the def line and the docstring stay outside the pair:

    def rotate_half(x):
        """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
        # exercise 1: RMSNorm and rotary embeddings
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
        # end exercise 1

An exercise may span several functions, each with its own pair. `make` keeps the markers
and replaces what lies between them by a `# hint:` comment and a `raise NotImplementedError`,
so the copy still imports and the tests of every other exercise still run. The tests of an
exercise use its own functions only (tests/test_exercise_checks.py writes out what they need
of the others), so the exercises can be done in any order. EXERCISES below is the one table:
number, title, the functions with a hint each, and the tests with a hint each.
'''
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from loranull_mini.files import write_text

ROOT = Path(__file__).resolve().parents[1]        # the project this module belongs to
CORE_FILES = ("model.py", "lora.py", "nullspace.py")
NOT_COPIED = {"tests/test_exercises.py",          # tests that need the reference bodies: of this module,
              "tests/test_tutorial.py"}           # and of the code docs/TUTORIAL.md quotes
TOP_LEVEL_OUTPUTS = {"runs", "out", "build"}
SKIPPED_DIRS = {".git", ".venv", ".venv-ci", "runs", "out", "build", "__pycache__", ".pytest_cache", ".whl"}
START = re.compile(r"^(?P<indent>[ \t]*)# exercise (?P<number>\d+): (?P<title>.+?)\s*$")
END = re.compile(r"^(?P<indent>[ \t]*)# end exercise (?P<number>\d+)\s*$")
BLANK = "raise NotImplementedError(\"exercise "    # how a blanked body starts its code
LOCATION = re.compile(r"^(\S+\.py):(\d+): \w+", re.MULTILINE)  # "model.py:91: NotImplementedError" in a traceback


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str                 # as in the opening markers
    functions: dict            # "file.py:qualified.name" -> hint for its body
    tests: dict                # pytest node id -> hint printed when that test fails


PRIMITIVES, CHECKS = "tests/test_primitives.py::", "tests/test_exercise_checks.py::"
LORA, NULLSPACE = "tests/test_lora.py::", "tests/test_nullspace.py::"

EXERCISES = [
    Exercise(1, "RMSNorm and rotary embeddings", {
        "model.py:RMSNorm.forward": "in float32, x * rsqrt(mean of x^2 over the last dim + eps); back to x's dtype, "
                                    "times self.weight",
        "model.py:rotary_cos_sin": "inv_freq_i = theta^(-2i/hd), i = 0..hd/2-1; angles = positions[..., None] * "
                                   "inv_freq (B, T, hd/2), concatenated with themselves (B, T, hd); return cos, sin",
        "model.py:rotate_half": "split the last dim into halves x1, x2 and return cat(-x2, x1)",
        "model.py:apply_rotary": "give cos and sin a head dim, (B, 1, T, hd), in x's dtype; "
                                 "return x * cos + rotate_half(x) * sin",
    }, {
        PRIMITIVES + "test_rotary_angles_are_position_times_theta_to_the_minus_2i_over_hd":
            "rotary_cos_sin: pair i at position p turns by p * theta^(-2i/hd); the (B, T, hd/2) angles go twice "
            "along the last dim (rotate-half layout)",
        PRIMITIVES + "test_rotary_turns_each_pair_counterclockwise_by_its_angle":
            "apply_rotary: x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1): (a, b) -> "
            "(a cos - b sin, a sin + b cos)",
        PRIMITIVES + "test_rotary_scores_depend_on_the_relative_position_only":
            "q and k each turned by their own position: q.k must depend on pq - pk only; check the sign in "
            "rotate_half and the angles' layout",
        PRIMITIVES + "test_rmsnorm_is_x_over_root_mean_square_plus_eps_times_weight":
            "RMSNorm: x / sqrt(mean(x^2) + eps) over the last dim (eps inside the root), then times self.weight",
    }),
    Exercise(2, "grouped-query attention and the KV cache", {
        "model.py:repeat_kv": "n_rep == 1: x itself; else a new dim after the heads, x[:, :, None], expanded to "
                              "n_rep and reshaped to (B, Hkv * n_rep, S, hd)",
        "model.py:Attention.forward": "q, k, v: projections viewed (B, T, heads, hd), transposed to (B, heads, T, hd); "
                                      "rotate q and k; with a cache, write k, v at slots cache.length.. of `layer` and "
                                      "read every slot so far; repeat_kv when repeat_kv_heads(mask, x.device) (a mask "
                                      "and not on the CPU), else SDPA's enable_gqa; is_causal when mask is None; "
                                      "(B, T, H * hd) through wo",
    }, {
        PRIMITIVES + "test_repeat_kv_gives_query_head_h_the_kv_head_h_over_n_rep":
            "repeat_kv: query head h reads kv head h // n_rep: expand a new dim right after Hkv, then reshape "
            "(torch.repeat would give h % Hkv)",
        CHECKS + "test_attention_equals_attention_by_hand_with_padding[True]":
            "repeat_kv_heads() True: repeat k and v to H heads with repeat_kv, then SDPA with attn_mask=mask",
        CHECKS + "test_attention_equals_attention_by_hand_with_padding[False]":
            "repeat_kv_heads() False: SDPA(q, k, v, attn_mask=mask, enable_gqa=True) on the Hkv key/value heads",
        CHECKS + "test_attention_with_a_kv_cache_equals_one_pass_over_the_sequence[True]":
            "with a cache: cache.k[layer, :, :, start:start + T] = k (likewise v), start = cache.length, then attend "
            "to slots :start + T; Attention leaves cache.length alone",
        CHECKS + "test_attention_with_a_kv_cache_equals_one_pass_over_the_sequence[False]":
            "with a cache: store the ROTATED keys, then read back all slots so far, (B, Hkv, S, hd); no mask: "
            "is_causal=True, a mask: is_causal=False",
    }),
    Exercise(3, "the LoRA layer", {
        "lora.py:LoRALinear.forward": "y = base(x); merged: y alone; else y + scaling * (dropout(x) @ A.T) @ B.T "
                                      "(x in A's dtype, the update cast to y's dtype)",
        "lora.py:LoRALinear.delta_weight": "scaling * B @ A in float32, inside torch.autocast(device type, "
                                           "enabled=False)",
        "lora.py:LoRALinear.merge": "only when not merged: base.weight += delta_weight() (in float32, back to the "
                                    "weight's dtype, in place with copy_); merged = True",
        "lora.py:LoRALinear.unmerge": "only when merged: base.weight -= delta_weight() (float32, in place); "
                                      "merged = False",
    }, {
        LORA + "test_forward_is_base_plus_scaled_low_rank_update":
            "forward = base(x) + scaling * (x @ A.T) @ B.T; delta_weight = scaling * B @ A",
        LORA + "test_merge_then_unmerge_restores_the_weight_and_merging_twice_merges_once":
            "merge adds delta_weight() to base.weight only if not yet merged; unmerge subtracts it only if merged",
        LORA + "test_merged_and_unmerged_layer_compute_the_same_output":
            "a merged layer's forward returns base(x) alone: the update is already in the weight",
        LORA + "test_dropout_acts_on_the_adapter_input_only":
            "dropout goes on the adapter's input, self.dropout(x) @ A.T, never on the base path",
        LORA + "test_bf16_autocast_forward_runs_and_stays_close":
            "under bfloat16 autocast the output keeps base(x)'s dtype: cast the scaled update to y.dtype",
    }),
    Exercise(4, "PiSSA and MiLoRA", {
        "lora.py:_svd_split": "s = alpha / r; thin SVD of W in float32 (torch.svd_lowrank(W, q=r, niter=niter) when "
                              "niter is given); U[:, keep], S[keep], Vh[keep]; root = sqrt(S_r / s); A = root[:, None] "
                              "* Vh_r, B = U_r * root; W_res = W - s * B @ A",
    }, {
        LORA + "test_pissa_adapter_holds_the_largest_singular_triplets[4]":
            "A = sqrt(S_r / s)[:, None] * Vh_r and B = U_r * sqrt(S_r / s): balanced, s * B @ A = U_r S_r Vh_r",
        LORA + "test_pissa_adapter_holds_the_largest_singular_triplets[16]":
            "divide S_r by s = alpha / r inside the square root, so s * B @ A does not depend on alpha",
        LORA + "test_milora_adapter_holds_the_smallest_singular_triplets":
            "`keep` picks the triplets: U[:, keep], S[keep], Vh[keep] (MiLoRA passes slice(-r, None))",
        LORA + "test_randomized_pissa_matches_exact_pissa_given_a_spectral_gap":
            "niter given: U, S, V = torch.svd_lowrank(W32, q=r, niter=niter), and Vh = V.T",
        LORA + "test_init_residual_plus_scaled_product_equals_weight[4-pissa]":
            "W_res = W - s * B @ A, so that W_res + s * B @ A == W",
        LORA + "test_init_residual_plus_scaled_product_equals_weight[4-milora]":
            "W_res = W - s * B @ A, so that W_res + s * B @ A == W",
        LORA + "test_init_residual_plus_scaled_product_equals_weight[16-pissa]":
            "W_res = W - s * B @ A with s = alpha / r",
        LORA + "test_init_residual_plus_scaled_product_equals_weight[16-milora]":
            "W_res = W - s * B @ A with s = alpha / r",
        LORA + "test_inits_return_float32_factors_and_the_residual_in_the_weights_dtype[pissa]":
            "compute in float32; return A, B in factor_dtype(W) and W_res in W.dtype",
        LORA + "test_inits_return_float32_factors_and_the_residual_in_the_weights_dtype[milora]":
            "compute in float32; return A, B in factor_dtype(W) and W_res in W.dtype",
    }),
    Exercise(5, "the covariance hook", {
        "nullspace.py:collect_covariances.hook.record": "x = args[0] as (B*T, n); drop the rows where `keep` (this "
                                                        "batch's pad mask; None: keep all) is False; in float64, add "
                                                        "x.T @ x to sums[name] and len(x) to counts[name]",
        "nullspace.py:covariance": "N == 0: ValueError 'no calibration tokens reached {name}'; S's diagonal not "
                                   "finite: ValueError 'NaN/Inf ... {name}'; N < n: warnings.warn (rank-deficient); "
                                   "return (S + S.T) / (2 N)",
    }, {
        CHECKS + "test_hook_covariance_is_the_gram_matrix_of_the_real_tokens":
            "record: flatten args[0] to (B*T, n), keep the rows where keep is True, then x.T @ x in float64 into "
            "sums[name] and the row count into counts[name]",
        CHECKS + "test_covariance_divides_the_symmetrised_sum_by_the_token_count":
            "covariance: (S + S.T) / (2 * N), exactly symmetric",
        CHECKS + "test_covariance_refuses_missing_tokens_and_nonfinite_sums_and_warns_when_rank_deficient":
            "covariance: N == 0 -> ValueError 'no calibration tokens reached {name}'; NaN/Inf on S's diagonal -> "
            "ValueError 'NaN/Inf ... {name}'; N < n -> a warning that says 'rank-deficient'",
    }),
    Exercise(6, "the null basis and LoRA-Null", {
        "nullspace.py:null_basis": "check_covariance(C, r); torch.linalg.eigh of C in float64 (eigenvalues ascending); "
                                   "the first r eigenvector columns",
        "nullspace.py:loranull_init": "check_init_inputs; s = alpha / r; U = null_basis(C, r) unless U_null is given; "
                                      "in float64, SVD of the small W @ U = U' S' Q'^T; A = sqrt(S'/s)[:, None] * "
                                      "(Q'^T @ U.T), B = U' * sqrt(S'/s); W_res = W - s * B @ A",
    }, {
        NULLSPACE + "test_null_basis_is_orthonormal_eigenvectors_of_smallest_eigenvalues":
            "null_basis: torch.linalg.eigh(C.double()) sorts eigenvalues ascending; take columns Q[:, :r]",
        NULLSPACE + "test_rows_of_A_lie_in_the_null_basis":
            "A = sqrt(S'/s)[:, None] * (Q'^T @ U.T): each row of A a combination of U's columns",
        NULLSPACE + "test_null_init_annihilates_calibration_inputs":
            "the adapter holds W_null = W @ U @ U.T, and W_res = W - s * B @ A = W @ (I - U U^T)",
        NULLSPACE + "test_small_svd_factors_equal_full_svd_of_projected_weight[24-40-6]":
            "SVD of the (m, r) matrix W @ U = U' S' Q'^T; B = U' * sqrt(S'/s), A = sqrt(S'/s)[:, None] * (Q'^T @ U.T)",
        NULLSPACE + "test_small_svd_factors_equal_full_svd_of_projected_weight[48-32-8]":
            "work in float64 (W.double()); W_res = W - s * B @ A",
        NULLSPACE + "test_null_init_captures_the_least_calibration_energy":
            "the basis comes from the r SMALLEST eigenvalues of C (eigh is ascending: Q[:, :r], not Q[:, -r:])",
        NULLSPACE + "test_residual_plus_scaled_adapter_equals_weight[24-40-6-12.0-loranull]":
            "W_res = W - s * B @ A, computed in float64, returned in W's dtype; A, B in lora.factor_dtype(W)",
        NULLSPACE + "test_residual_plus_scaled_adapter_equals_weight[48-32-8-8.0-loranull]":
            "W_res = W - s * B @ A, computed in float64, returned in W's dtype; A, B in lora.factor_dtype(W)",
        NULLSPACE + "test_residual_plus_scaled_adapter_equals_weight[40-40-40-3.0-loranull]":
            "r = n: the null basis is all of R^n and W_res = 0 up to rounding",
        NULLSPACE + "test_residual_does_not_depend_on_alpha[loranull]":
            "divide S' by s = alpha / r inside the square root: s * B @ A = W_null for every alpha",
        NULLSPACE + "test_inits_reject_bad_inputs[loranull]":
            "start loranull_init with check_init_inputs(W, C, r, alpha)",
    }),
]
BY_NUMBER = {e.number: e for e in EXERCISES}


class ExerciseError(Exception):
    """A problem with a copy, a directory or the markers, said in one message."""


# ----------------------------------------------------------------------------- the markers
@dataclass
class Region:
    file: str            # relative path, e.g. "model.py"
    function: str        # qualified name of the function whose body it is, e.g. "RMSNorm.forward"
    number: int
    title: str
    indent: str
    start: int           # index of the opening marker line
    end: int             # index of the closing marker line

    def key(self) -> str:
        return f"{self.file}:{self.function}"


def function_spans(source: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, last line) of every function, nested ones included."""
    spans = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                spans.append((prefix + child.name, child.lineno, child.end_lineno))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return spans


def find_regions(root: Path, file: str) -> list[Region]:
    """The marked regions of one file, in order; a clear error for a broken marker pair."""
    path = root / file
    if not path.is_file():
        raise ExerciseError(f"{path} not found: is {root} a copy of the project?")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    try:
        spans = function_spans(text)
    except SyntaxError as e:
        spans = None
        syntax_error = f"{file} line {e.lineno}: {e.msg}"
    regions, open_at = [], None
    for i, line in enumerate(lines):
        start, end = START.match(line), END.match(line)
        if start:
            if open_at is not None:
                raise ExerciseError(f"{file}:{i + 1}: exercise marker inside the region opened at line {open_at + 1}")
            open_at, opened = i, start
        elif end:
            if open_at is None or int(end["number"]) != int(opened["number"]) or end["indent"] != opened["indent"]:
                raise ExerciseError(f"{file}:{i + 1}: '# end exercise {end['number']}' does not close an opening "
                                    f"'# exercise {end['number']}: ...' marker at the same indentation")
            if spans is None:
                raise ExerciseError(f"cannot read the functions of {file}: {syntax_error}")
            inside = [(first, name) for name, first, last in spans if first <= open_at + 1 <= last]
            if not inside:
                raise ExerciseError(f"{file}:{open_at + 1}: exercise region outside a function body")
            regions.append(Region(file, max(inside)[1], int(opened["number"]), opened["title"], opened["indent"],
                                  open_at, i))
            open_at = None
    if open_at is not None:
        raise ExerciseError(f"{file}:{open_at + 1}: exercise region without its '# end exercise' line")
    return regions


def all_regions(root: Path) -> list[Region]:
    """Every region of the core files, checked against EXERCISES (numbers, titles, functions)."""
    regions = [r for file in CORE_FILES for r in find_regions(root, file)]
    for r in regions:
        exercise = BY_NUMBER.get(r.number)
        if exercise is None or r.title != exercise.title or r.key() not in exercise.functions:
            raise ExerciseError(f"{r.file}:{r.start + 1}: the marker 'exercise {r.number}: {r.title}' in "
                                f"{r.function} is not in the EXERCISES table of {Path(__file__).name}")
    marked = [r.key() for r in regions]
    for exercise in EXERCISES:
        for key in exercise.functions:
            if marked.count(key) != 1:
                raise ExerciseError(f"exercise {exercise.number}: {key} should hold exactly one marked region, "
                                    f"found {marked.count(key)}")
    return regions


def is_blank(lines: list[str], region: Region) -> bool:
    return any(line.strip().startswith(BLANK) for line in lines[region.start + 1:region.end])


def blank_body(region: Region) -> list[str]:
    """The lines that stand for a blanked body: the hint as a comment, then the raise."""
    exercise = BY_NUMBER[region.number]
    hint = exercise.functions[region.key()]
    comment = textwrap.wrap(hint, 110 - len(region.indent), initial_indent="# hint: ", subsequent_indent="#       ",
                            break_on_hyphens=False)
    message = json.dumps(f"exercise {exercise.number}: {exercise.title} — {hint}", ensure_ascii=False)
    return [region.indent + line for line in comment] + [f"{region.indent}raise NotImplementedError({message})"]


def replace_bodies(path: Path, regions: list[Region], bodies: list[list[str]]):
    """Write `path` with the body of each region replaced (markers kept)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for region, body in sorted(zip(regions, bodies), key=lambda rb: -rb[0].start):
        lines[region.start + 1:region.end] = body
    text = "\n".join(lines) + "\n"
    try:
        compile(text, str(path), "exec")  # a replacement never leaves a file that does not parse
    except SyntaxError as e:
        raise ExerciseError(f"{path} would not parse (line {e.lineno}: {e.msg}); nothing written") from None
    try:
        write_text(path, text)                       # atomic: the old file or the new one, never half
    except OSError as e:
        raise ExerciseError(f"{e}; {path} is unchanged") from None


# ----------------------------------------------------------------------------- make and solve
def project_files(root: Path) -> list[str]:
    """The files of the project: git's tracked and not-ignored files, or a walk without build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n and (root / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        names = []
    if not names:                                    # not a git checkout: walk it
        for dirpath, dirnames, filenames in os.walk(root):
            top = Path(dirpath) == Path(root)  # runs/, out/, build/ are outputs only at the top (.gitignore's /runs/)
            dirnames[:] = sorted(d for d in dirnames if not d.endswith(".egg-info") and not (
                d in SKIPPED_DIRS and (top or d not in TOP_LEVEL_OUTPUTS)))
            names += [str(Path(dirpath, f).relative_to(root)) for f in sorted(filenames) if not f.endswith(".pyc")]
    return sorted(n.replace(os.sep, "/") for n in names if n.replace(os.sep, "/") not in NOT_COPIED)


def make(dest: Path, source: Path = ROOT) -> list[str]:
    """Copy the project to `dest` with every exercise body blanked; returns the files copied."""
    source, dest = source.resolve(), dest.resolve()
    regions = all_regions(source)
    lines = {f: (source / f).read_text(encoding="utf-8").splitlines() for f in CORE_FILES}
    if any(is_blank(lines[r.file], r) for r in regions):
        raise ExerciseError(f"{source} is itself a student copy (its exercises are blanked): make copies from "
                            f"the original project")
    if dest == source or source in dest.parents:
        raise ExerciseError(f"{dest} lies inside the project {source}: choose a directory outside it")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExerciseError(f"{dest} already exists and is not an empty directory")
    files = project_files(source)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")  # built aside, then renamed: never a half copy
    try:
        for name in files:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target)
        for file in CORE_FILES:
            mine = [r for r in regions if r.file == file]
            replace_bodies(tmp / file, mine, [blank_body(r) for r in mine])
        if dest.exists():
            dest.rmdir()                             # empty, checked above
        os.replace(tmp, dest)
    except OSError as e:
        raise ExerciseError(f"cannot write the student copy {dest}: {e.strerror or e}; nothing was left there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def solve(numbers: list[int], dest: Path, source: Path = ROOT) -> list[str]:
    """Put the reference bodies of the exercises `numbers` from `source` back into the copy `dest`."""
    source, dest = source.resolve(), dest.resolve()
    if dest == source:
        raise ExerciseError(f"{dest} is the project the solutions come from: give the student copy with --dir")
    theirs = all_regions(dest)
    ours = {r.key(): r for r in all_regions(source)}
    done = []
    for file in CORE_FILES:
        lines = (source / file).read_text(encoding="utf-8").splitlines()
        chosen = [r for r in theirs if r.file == file and r.number in numbers]
        bodies = []
        for r in chosen:
            if is_blank(lines, ours[r.key()]):
                raise ExerciseError(f"{source} holds no solution of {r.key()} (it is a student copy): pass the "
                                    f"original project with --source")
            bodies.append(lines[ours[r.key()].start + 1:ours[r.key()].end])
        if chosen:
            replace_bodies(dest / file, chosen, bodies)
        done += [r.key() for r in chosen]
    return done


# ----------------------------------------------------------------------------- check
def node_id(classname: str, name: str) -> str:
    """pytest's node id of a JUnit test case (module-level test functions)."""
    return f"{classname.replace('.', '/')}.py::{name}"


def junit_outcomes(path: Path) -> dict[str, tuple[str, str]]:
    """{node id: ("pass" | "fail" | "skip", first line of the failure message)} from a JUnit XML file."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message, traceback = "pass", "", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "fail", (child.get("message") or child.text or "").strip()
                traceback = child.text or ""
            elif child.tag == "skipped" and outcome == "pass":
                outcome, message = "skip", (child.get("message") or "").strip()
        first = message.splitlines()[0] if message else ""
        if first.startswith("NotImplementedError: exercise"):
            first = "NotImplementedError: not written yet"
        places = LOCATION.findall(traceback)
        if places:                                   # the innermost file:line of the traceback
            first += f" (at {places[-1][0]}:{places[-1][1]})"
        outcomes[node_id(case.get("classname", ""), case.get("name", ""))] = (outcome, first)
    return outcomes


def run_tests(nodes: list[str], dest: Path, timeout: float) -> tuple[dict, str]:
    """Run pytest on `nodes` in the copy `dest` (its own rootdir and config); (outcomes, output)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                   "--rootdir", str(dest), f"--junitxml={report}", *nodes]
        try:
            done = subprocess.run(command, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExerciseError(f"the tests took longer than {timeout:g} s (an endless loop?); run them yourself: "
                                f"cd {dest} && python -m pytest {' '.join(nodes[:1])} ...") from None
        outcomes = junit_outcomes(report) if report.is_file() else {}
    return outcomes, done.stdout + done.stderr


def check(numbers: list[int], dest: Path, timeout: float = 600, out=print) -> bool:
    """Run the tests of the exercises `numbers` on the copy `dest`; print each test's outcome and, for
    a failure, its hint. True when all pass."""
    dest = dest.resolve()
    if not dest.is_dir():
        raise ExerciseError(f"{dest} is not a directory")
    nodes = [node for n in numbers for node in BY_NUMBER[n].tests]
    missing = sorted({n.split("::")[0] for n in nodes if not (dest / n.split("::")[0]).is_file()} |
                     {f for f in CORE_FILES if not (dest / f).is_file()})
    if missing:
        raise ExerciseError(f"{dest} does not look like a copy of the project: {', '.join(missing)} not found "
                            f"(make one with: python -m loranull_mini.exercises make DIR)")
    outcomes, output = run_tests(nodes, dest, timeout)
    all_pass, not_run = True, False
    for n in numbers:
        exercise = BY_NUMBER[n]
        out(f"exercise {n}: {exercise.title}")
        failed = 0
        for node, hint in exercise.tests.items():
            outcome, message = outcomes.get(node, ("not run", ""))
            if outcome == "pass":
                out(f"  pass  {node}")
                continue
            failed += 1
            not_run |= outcome == "not run"
            out(f"  {outcome.upper():4}  {node}")
            out(f"        hint:  {hint}")
            if message:
                out(f"        error: {message if len(message) <= 160 else message[:159] + '…'}")
        total = len(exercise.tests)
        out(f"exercise {n}: all {total} tests pass" if not failed else f"exercise {n}: {failed} of {total} tests fail")
        all_pass &= not failed
    if not_run:
        out("some tests did not run; pytest said:\n" + "\n".join(output.strip().splitlines()[-30:]))
    return all_pass


# ----------------------------------------------------------------------------- the command line
def exercise_numbers(text: str) -> list[int]:
    """argparse type: "all", or one exercise number."""
    if text == "all":
        return [e.number for e in EXERCISES]
    if not text.isdigit() or int(text) not in BY_NUMBER:
        raise argparse.ArgumentTypeError(f"no exercise {text!r}: choose from {', '.join(map(str, BY_NUMBER))} or "
                                         f"'all' (python -m loranull_mini.exercises list)")
    return [int(text)]


def print_list(out=print):
    for e in EXERCISES:
        out(f"{e.number}. {e.title}")
        by_file = {}
        for key in e.functions:
            file, function = key.split(":")
            by_file.setdefault(file, []).append(function)
        for file, functions in by_file.items():
            out(f"   {file}: {', '.join(functions)}")
        out(f"   tests ({len(e.tests)}):")
        for node in e.tests:
            out(f"     {node}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m loranull_mini.exercises",
        description="Exercises made from the real code: blank the marked function bodies, write them again, "
                    "and check them with the project's own tests.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="the exercises with their titles, functions and tests")
    p = commands.add_parser("make", help="write a student copy of the project with every exercise blanked")
    p.add_argument("dir", metavar="DIR", type=Path, help="where to write the copy (new or empty, outside the project)")
    p = commands.add_parser("check", help="run the tests of exercise N on a copy; exit code 0 when all pass")
    p.add_argument("numbers", metavar="N", type=exercise_numbers, nargs="+",
                   help="exercise number(s), or 'all'")
    p.add_argument("--dir", type=Path, default=Path("."), help="the copy to test (default: the current directory)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the test run is stopped (default 600)")
    p = commands.add_parser("solve", help="put the reference solution of exercise N back into a copy")
    p.add_argument("numbers", metavar="N", type=exercise_numbers, nargs="+", help="exercise number(s), or 'all'")
    p.add_argument("--dir", type=Path, default=Path("."), help="the student copy (default: the current directory)")
    p.add_argument("--source", type=Path, default=ROOT,
                   help=f"the project holding the solutions (default: this module's project, {ROOT})")
    args = parser.parse_args(argv)
    if hasattr(args, "numbers"):
        args.numbers = sorted({n for group in args.numbers for n in group})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "list":
            print_list()
        elif args.command == "make":
            files = make(args.dir)
            print(f"wrote {len(files)} files to {args.dir.resolve()}, exercises 1-{len(EXERCISES)} blanked; next:\n"
                  f"  cd {args.dir} && python -m loranull_mini.exercises check 1")
        elif args.command == "solve":
            for key in solve(args.numbers, args.dir, args.source):
                print(f"solved {key}")
        elif args.command == "check":
            return 0 if check(args.numbers, args.dir, args.timeout) else 1
    except (ExerciseError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
