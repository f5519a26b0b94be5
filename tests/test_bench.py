"""loranull_mini/bench.py: the FLOP counter against a hand count and torch's FLOP counter,
the table's arithmetic, one end-to-end run of the benchmark on a tiny checkpoint, and
`--quick` on SmolLM2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lora
from loranull_mini import bench
from model import ModelConfig
from tests.conftest import random_model

ALL = ("q", "k", "v", "o", "gate", "up", "down")
ROOT = Path(__file__).resolve().parents[1]


def test_training_flops_matches_a_hand_count_on_a_tiny_config():
    config = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=16, max_seq_len=16)
    # head_dim 4; (out, in): q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16; r = 2;
    # one sequence of 3 tokens: 3 tokens, 3 * 4 / 2 = 6 causal (query, key) pairs.
    T, r, pairs = 3, 2, 6

    def lora_flops(m, n, input_needs_grad):
        forward = 2 * r * (n + m) * T
        backward = 2 * m * r * T * 2 + 2 * r * n * T * (1 + input_needs_grad)  # dB, dh, dA (, dx)
        return forward + backward

    def projection(m, n, input_needs_grad):  # frozen base + adapter
        return 2 * m * n * T * (1 + input_needs_grad) + lora_flops(m, n, input_needs_grad)

    attention = 2 * 2 * 2 * 4 * pairs + 4 * (2 * 2 * 4 * pairs)  # Q K^T and P V; dP, dV, dQ, dK
    # block 0: q, k, v read the frozen embedding (no input gradient); everything after does
    block0 = (projection(8, 8, False) + 2 * projection(4, 8, False) + attention + projection(8, 8, True)
              + 2 * projection(16, 8, True) + projection(8, 16, True))
    block1 = (projection(8, 8, True) + 2 * projection(4, 8, True) + attention + projection(8, 8, True)
              + 2 * projection(16, 8, True) + projection(8, 16, True))
    output = 2 * 10 * 8 * T * 2
    assert block0 + block1 + output == 24096  # the same count, written out
    assert bench.training_flops(config, r, ALL, batch=1, seq_len=T) == 24096


def attention_flops(config, batch, T, backward_products):
    """Causal attention: two products forward in every block, plus the backward ones."""
    pairs = batch * T * (T + 1) // 2
    one = 2 * config.n_heads * config.head_dim * pairs  # one product over all (query, key) pairs
    return 2 * one * config.n_layers + one * backward_products


@pytest.mark.parametrize("targets, freeze_A, backward_products", [
    (ALL, False, 4 + 4), (ALL, True, 4 + 4),  # dP, dV, dQ, dK in both blocks
    (("down",), False, 0 + 4),  # block 0's attention holds nothing to train and reads frozen inputs
    (("v", "up"), True, 1 + 4),  # block 0: only v has an adapter, so only dV = P^T dO
])
def test_training_flops_equal_torch_flop_counter_on_a_real_step(targets, freeze_A, backward_products):
    """torch's FlopCounterMode counts the matmuls autograd really runs (on CPU it has no formula
    for the fused attention kernel, which is counted by hand here)."""
    model = random_model()
    lora.inject_lora(model, targets, r=4, alpha=8, freeze_A=freeze_A)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    counted = bench.training_flops(model.config, 4, targets, batch=2, seq_len=12, freeze_A=freeze_A)
    assert counted - attention_flops(model.config, 2, 12, backward_products) == matmuls


def test_rows_report_medians_ratios_and_targets():
    faster = bench.row("x", "tokens/s", [3.0, 1.0, 2.0], [1.0, 2.0, 1.5], 1.1, higher_is_better=True)
    assert (faster["ours"], faster["theirs"], faster["ratio"], faster["met"]) == (2.0, 1.5, 2.0 / 1.5, True)
    slower = bench.row("y", "s", [4.0], [3.0], 1.0)
    assert slower["ratio"] == 4.0 / 3.0 and slower["met"] is False
    assert bench.row("z", "s", [1.0], [2.0])["met"] is None
    text = bench.table([faster, slower])
    assert "| x | 2 | 1.5 | 1.333 | >= 1.1 | yes |" in text and "| NO |" in text
    assert bench.missed_notes([faster, slower]) == ["target missed: y (ratio 1.333): "]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_bench_runs_both_stacks_end_to_end_on_a_tiny_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    result = bench.main(["--model", str(tmp_path / "tiny"), "--rank", "4", "--alpha", "8", "--calib-samples", "4",
                         "--calib-len", "80", "--train-batch", "2", "--train-len", "16",
                         "--gen-batch", "3", "--gen-tokens", "4", "--matmul-size", "128",
                         "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    rows = {r["name"].split(",")[0].split(" (")[0]: r for r in result["rows"]}
    assert len(result["rows"]) == 12
    assert result["environment"]["max_abs_logit_difference"] < 1e-4  # the same weights in both stacks
    train = rows["train: tokens/s"]
    assert train["first_loss"]["ours"] == pytest.approx(train["first_loss"]["theirs"], rel=1e-5)
    assert rows["generate: tokens/s"]["same_greedy_rows"] == "3/3"
    padding = rows["train: padding-free rows vs padded"]["padding_fraction"]
    assert padding["packed"] <= padding["padded"]  # rows of 16 tokens: little room to pack
    init_rows = [r for r in result["rows"] if r["name"].startswith("init: LoRA-Null")]
    assert [f"({4 * 80} calib. tokens)" in r["name"] for r in init_rows] == [True, True, False]  # then 4x
    assert ["eigh basis" in r["name"] for r in init_rows] == [True, False, False]  # the default basis, then fast
    for r in result["rows"]:
        once = "memory" in r["name"] or r is init_rows[2]  # the 4x-calibration row is timed once
        assert len(r["ours_all"]) == len(r["theirs_all"]) == (1 if once else 3)
        assert r["ours"] > 0 and r["theirs"] > 0


def test_bench_quick_runs_on_smollm2_and_prints_every_row(tmp_path):
    """`python -m loranull_mini.bench --quick` (what CI can afford) on the real SmolLM2 weights:
    both stacks measured, every row printed with ours, theirs, ratio, target and met."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = subprocess.run([sys.executable, "-m", "loranull_mini.bench", "--quick", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["config"]["quick"] and result["config"]["repeats"] == 1
    assert len(result["rows"]) == 12
    assert "| measurement | ours | theirs | ratio ours/theirs | target | met |" in out.stdout
    for r in result["rows"]:
        line = next((l for l in out.stdout.splitlines() if l.startswith(f"| {r['name']} |")), None)
        assert line is not None, r["name"]
        assert line.count("|") == 7 and r["ours"] > 0 and r["theirs"] > 0
    assert result["environment"]["max_abs_logit_difference"] < 1e-3  # the same weights in both stacks
