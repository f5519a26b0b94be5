"""train.py end to end on the toy world: learning, reloading, exact resume, data parallel, errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from loranull_mini import adapter_io, toy
from loranull_mini.data import Example, collate

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "toy", "--steps", "12", "--eval-every", "6", "--ckpt-every", "4", "--batch-size", "16"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, *args, name="run"):
    return train.main(QUICK + ["--out", str(tmp_path / name), *args])


def adapter_tensors(out):
    return load_file(str(Path(out) / "adapter" / "adapter.safetensors"))


def probe_logits(model):
    tok = toy.ToyTokenizer()
    rows = toy.heldout_facts()[:8] + toy.skill_task("test", 8)
    batch = collate([Example(tok.encode_chat([{"role": "user", "content": r["question"]}]), 0) for r in rows], tok.pad_id)
    model.eval()
    with torch.no_grad():
        return model(batch["idx"], pad_mask=batch["pad_mask"])[0]


def test_toy_training_loss_falls(tmp_path):
    result = train.main(["--preset", "toy", "--init", "vanilla", "--steps", "60", "--eval-every", "30",
                         "--out", str(tmp_path / "run")])
    losses = [r["loss"] for r in result["metrics"]]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    evals = [r["heldout_loss"] for r in result["metrics"] if "heldout_loss" in r]
    assert evals[-1] < evals[0]
    out = Path(result["out"])
    assert {"adapter", "adapter-delta", "metrics.jsonl", "loss.png", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))


@pytest.mark.parametrize("init", ["vanilla", "pissa", "milora", "corda", "null", "null-v2"])
def test_each_init_saves_an_adapter_that_reloads_to_identical_logits(tmp_path, init):
    args = ["--init", "null", "--v2"] if init == "null-v2" else ["--init", init]
    result = run(tmp_path, *args)
    trained = probe_logits(result["model"])
    fresh, _ = toy.load_toy_model()
    ref = probe_logits(fresh)
    adapter_io.load_adapter(fresh, Path(result["out"]) / "adapter")
    torch.testing.assert_close(probe_logits(fresh), trained, rtol=0, atol=1e-5)
    assert (trained - ref).abs().max() > 1e-3  # training changed the model
    # the plain-delta export on the original weights gives the same model
    delta, _ = toy.load_toy_model()
    adapter_io.load_adapter(delta, Path(result["out"]) / "adapter-delta")
    torch.testing.assert_close(probe_logits(delta), trained, rtol=1e-4, atol=1e-4)


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    full = run(tmp_path, "--init", "null", name="full")
    real_get_lr = train.get_lr

    def crash_at_step_7(step, cfg):
        if step == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_get_lr(step, cfg)

    monkeypatch.setattr(train, "get_lr", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--init", "null", name="crashed")
    saved = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4                                   # the last checkpoint before the crash
    started = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert started["resumes"] == [] and started["config"]["steps"] == 12
    monkeypatch.setattr(train, "get_lr", real_get_lr)
    resumed = run(tmp_path, "--init", "null", "--resume", "--ckpt-every", "2", name="crashed")
    a, b = adapter_tensors(full["out"]), adapter_tensors(resumed["out"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(l) for l in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # the count of real tokens goes on from the checkpoint's, as in the uninterrupted run
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in full["metrics"]]
    # run.json keeps the settings the run started with and records the resume
    record = json.loads((tmp_path / "crashed" / "run.json").read_text())
    assert record == {"config": started["config"], "resumes": [{"step": 4, "changed": {"ckpt_every": 2}}]}


def test_resume_refuses_changed_settings_and_fresh_run_refuses_to_overwrite(tmp_path):
    run(tmp_path, "--init", "vanilla")
    with pytest.raises(ValueError, match="differ"):
        run(tmp_path, "--init", "vanilla", "--rank", "4", "--resume")
    with pytest.raises(ValueError, match="alpha"):
        run(tmp_path, "--init", "vanilla", "--alpha", "4", "--resume")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path, "--init", "vanilla", "--resume", name="never-ran")
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, "--init", "vanilla")


def test_heldout_loss_is_the_mean_answer_nll_and_keeps_no_graph():
    """The held-out loss is every answer token's NLL over their count, as the full-vocabulary
    path (metrics.sequence_nll) scores it, with autograd off and the vocabulary projection at the
    answer tokens only (it runs at every evaluation step, a study's every training step)."""
    import lora
    from loranull_mini import metrics
    from tests.conftest import random_model
    model = random_model(std=0.2)
    lora.inject_lora(model, r=4)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.B, std=0.1)                     # an adapter that changes the outputs
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(1, 60, (n,), generator=g).tolist(), 3) for n in (12, 4, 7, 9, 5, 11)]
    grad_seen, projected = [], []
    model.register_forward_hook(lambda *_: grad_seen.append(torch.is_grad_enabled()))
    model.output.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[:-1].numel()))
    model.train()
    cfg = train.TrainConfig(preset="toy", batch_size=4)
    got = train.heldout_loss(model, exs, 0, cfg, torch.device("cpu"), None)
    assert model.training and grad_seen == [False, False]           # mode restored; two batches, no graph
    assert sum(projected) == sum(len(e.ids) - 3 for e in exs)       # positions projected: answer tokens only
    nll, count = metrics.sequence_nll(model.eval(), exs, pad_id=0)
    assert got == pytest.approx(sum(nll) / sum(count), rel=1e-6) and sum(count) == sum(len(e.ids) - 3 for e in exs)


def test_loss_mask_leaves_prompt_tokens_out_of_the_loss():
    # prompt = 3 tokens, answer = 2 tokens: targets t=2 and t=3 (the answer tokens) only
    batch = collate([Example([5, 6, 7, 8, 9], 3), Example([5, 6, 8, 9], 2)], pad_id=0)
    assert batch["idx"].tolist() == [[5, 6, 7, 8], [5, 6, 8, 0]]
    assert batch["targets"].tolist() == [[6, 7, 8, 9], [6, 8, 9, -100]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    model, _ = toy.load_toy_model()
    logits, loss = model(batch["idx"], batch["targets"], batch["loss_mask"])
    logp = torch.log_softmax(logits, -1)
    by_hand = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[1, 1, 8] + logp[1, 2, 9]) / 4
    torch.testing.assert_close(loss, by_hand)
    # whatever the prompt targets are, the loss is the same
    other = batch["targets"].clone()
    other[0, :2] = torch.tensor([1, 2])
    torch.testing.assert_close(model(batch["idx"], other, batch["loss_mask"])[1], loss)


def train_two_processes(args, out):
    """train.py under torchrun with 2 processes, one thread each."""
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.fail("torchrun not found next to the Python interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ddp = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(ROOT / "train.py"), *args, "--out", str(out)],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]


def metrics_rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_matches_one_process(tmp_path):
    # CorDA: a covariance-based init whose factors are well determined by C (the null basis of a
    # rank-deficient toy C is an arbitrary choice among equal eigenvalues, so it is not compared here)
    args = ["--preset", "toy", "--init", "corda", "--steps", "6", "--batch-size", "16", "--grad-accum", "2",
            "--eval-every", "3", "--save-covariances"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True, cwd=ROOT)
    train_two_processes(args, tmp_path / "two")
    # the covariances are all-reduced: both runs see the same C, hence the same init. Every
    # calibration batch and its float32 product X^T X is the same in both runs (the batches
    # are dealt to the processes whole): the float64 sums differ only in the order of additions
    c1, c2 = load_file(str(tmp_path / "one" / "covariances.safetensors")), load_file(str(tmp_path / "two" / "covariances.safetensors"))
    assert c1.keys() == c2.keys()
    for k in c1:
        torch.testing.assert_close(c1[k], c2[k], rtol=1e-10, atol=1e-12)
    a1, a2 = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for k in (k for k in a1 if k.endswith((".A0", ".B0"))):
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-5, atol=1e-6)
    # the same global batch gives the same loss at every step, and the same trained adapter
    l1 = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 6
    for x, y in zip(l1, l2):
        assert abs(x - y) < 1e-4 * abs(x), (l1, l2)
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-3, atol=1e-4)
    # the count of real tokens is the global batches', as in one process
    assert [r["tokens"] for r in metrics_rows(tmp_path / "two")] == [r["tokens"] for r in metrics_rows(tmp_path / "one")]
    # every rank's random states are kept; both ranks seeded alike and drew alike (no dropout), so they are equal
    rng = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and all(set(states) == {"cpu"} for states in rng)
    assert torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def test_data_parallel_keeps_each_ranks_random_state_and_counts_the_global_tokens(tmp_path):
    # 3 examples per step split 2 / 1 (packed into 2 rows and 1), with dropout: the ranks draw
    # different amounts of randomness, so their states part, and one rank's token count times 2
    # is not the global count
    args = ["--preset", "toy", "--init", "vanilla", "--steps", "4", "--batch-size", "3", "--dropout", "0.1",
            "--eval-every", "4"]
    train_two_processes(args, tmp_path / "two")
    rng = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and all(set(states) == {"cpu"} for states in rng)
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])
    one = train.main(args + ["--out", str(tmp_path / "one")])
    assert [r["tokens"] for r in metrics_rows(tmp_path / "two")] == [r["tokens"] for r in one["metrics"]]
    assert one["metrics"][-1]["tokens"] == 4 * 3 * 4                       # 4 steps of 3 examples of 4 tokens


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--init", "lora-xl"])
    assert "invalid choice: 'lora-xl'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--rank must be at least 1"):
        run(tmp_path, "--rank", "0")
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        train.main(["--data", str(tmp_path / "no-such.jsonl"), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--v2"):
        run(tmp_path, "--init", "pissa", "--v2")
    with pytest.raises(ValueError, match="--targets"):
        run(tmp_path, "--targets", "q,attn")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = train.masked_nll
    calls = {"n": 0}

    def nan_after_five_steps(logits, targets, loss_mask=None):
        total, count = real(logits, targets, loss_mask)
        calls["n"] += torch.is_grad_enabled()             # training steps only, not the held-out loss
        return (total * float("nan"), count) if calls["n"] > 5 else (total, count)

    monkeypatch.setattr(train, "masked_nll", nan_after_five_steps)
    with pytest.raises(FloatingPointError, match="loss is nan at step 6"):
        run(tmp_path, "--init", "vanilla")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["adapters"].values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("init", ["vanilla", "null"])
def test_logged_disturbance_equals_the_dense_formula(tmp_path, init):
    import nullspace
    result = run(tmp_path, "--init", init)
    layers, covs = result["layers"], result["covariances"]
    dense = []
    for name, layer in layers.items():
        W_now = layer.base.weight.double() + layer.delta_weight().double()
        W0 = layer.base.weight.double() + (layer.scaling * layer.B0.double() @ layer.A0.double()
                                           if layer.has_residual else 0)
        dW, C = W_now - W0, covs[name]
        dense.append(float(torch.sqrt(torch.trace(dW @ C @ dW.T) / torch.trace(W0 @ C @ W0.T))))
    energies = {name: nullspace.output_energy(train.original_weight(layer), covs[name]) for name, layer in layers.items()}
    logged = train.mean_disturbance(layers, covs, energies)
    assert logged == pytest.approx(sum(dense) / len(dense), rel=1e-6)
    assert logged > 1e-4
    assert result["metrics"][-1]["disturbance"] == pytest.approx(logged, rel=1e-9)


def test_loranull_v2_keeps_A_frozen_and_calibration_outputs_still_while_the_loss_falls(tmp_path):
    # the toy world whose new skill reads inputs in the calibration's bottom eigenspace: there a
    # frozen null-space A can learn it (elsewhere it cannot: that is what the study measures)
    result = train.main(["--preset", "toy", "--toy-overlap", "bottom", "--init", "null", "--v2", "--steps", "40",
                         "--eval-every", "10", "--out", str(tmp_path / "v2")])
    for layer in result["layers"].values():
        assert torch.equal(layer.A, layer.A0)          # bit-identical after 40 AdamW steps
        assert not torch.equal(layer.B, layer.B0)       # while B trained
    evals = [r for r in result["metrics"] if "heldout_loss" in r]
    assert evals[-1]["heldout_loss"] < 0.8 * evals[0]["heldout_loss"]
    assert max(r["disturbance"] for r in evals) < 0.02
    v1 = train.main(["--preset", "toy", "--toy-overlap", "bottom", "--init", "null", "--steps", "40",
                     "--eval-every", "40", "--out", str(tmp_path / "v1")])
    assert v1["metrics"][-1]["disturbance"] > 5 * evals[-1]["disturbance"]


def test_full_fine_tuning_changes_every_weight_and_injects_no_adapter(tmp_path):
    from loranull_mini.checkpoint import load_model
    import lora
    base, _ = toy.load_toy_model()
    result = run(tmp_path, "--init", "full", "--lr", "1e-3")
    model, out = result["model"], Path(result["out"])
    assert not lora.lora_layers(model) and result["layers"] == {}
    before = dict(base.named_parameters())
    for name, p in model.named_parameters():
        assert p.requires_grad and not torch.equal(p.detach(), before[name].detach()), name
    assert (out / "model" / "model.safetensors").is_file() and not (out / "adapter").exists()
    assert not (out / "checkpoint.pt").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 12
    saved, _ = load_model(str(out / "model"))
    torch.testing.assert_close(probe_logits(saved), probe_logits(model), rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError, match="finished run"):
        run(tmp_path, "--init", "full")
    with pytest.raises(ValueError, match="--init full trains every weight"):
        run(tmp_path, "--init", "full", "--resume", name="other")
