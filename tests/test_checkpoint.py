"""Checkpoint formats: the real SmolLM2 GGUF, the rotary permutation, tokenizers found
next to the weights, and clear errors.

Parity with transformers on HF and Meta checkpoints is in test_model_parity.py. The real
assets are fetched on first use; a failed fetch fails the tests with the AssetError's message.
"""
import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from loranull_mini import assets, checkpoint
from loranull_mini.checkpoint import (CheckpointError, is_tiktoken_file, load_model, meta_ffn_params,
                                      meta_hidden_dim, permute_half_to_interleaved,
                                      permute_interleaved_to_half, read_checkpoint, save_hf, save_meta)
from model import apply_rotary, generate, rotary_cos_sin
from tests.conftest import random_model


# ----------------------------------------------------------------------------- real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2():
    return load_model()  # ~6-10 s on 2 cores: loaded once for the module


def test_smollm2_gguf_config_is_the_published_architecture(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert (c.rope_theta, c.norm_eps, c.max_seq_len, c.tie_embeddings) == (100000.0, 1e-5, 8192, True)
    assert model.num_params() == 134_515_008


def test_smollm2_embeddings_are_one_tied_parameter_and_nothing_is_left_on_meta(smollm2):
    model, _ = smollm2
    assert model.output.weight is model.tok_embeddings.weight
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def test_smollm2_greedily_continues_capital_of_france_with_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The capital of France is")
    assert prompt == [504, 3575, 282, 4649, 314]
    new = generate(model, [prompt], max_new_tokens=2)[0]
    assert tokenizer.decode(new).startswith(" Paris")


# ----------------------------------------------------------------------------- rotary layout
def test_permutations_are_inverse_and_not_the_identity():
    w = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    half = permute_interleaved_to_half(w, 3)
    assert not torch.equal(half, w)
    assert torch.equal(permute_half_to_interleaved(half, 3), w)
    assert torch.equal(permute_interleaved_to_half(permute_half_to_interleaved(w, 3), 3), w)
    # head 0 in rotate-half order: the even rows, then the odd rows of interleaved head 0
    assert torch.equal(half[:8], w[[0, 2, 4, 6, 1, 3, 5, 7]])


def interleaved_rotary(x, positions, theta):
    """Meta's rotary embedding: pairs (2i, 2i+1) as complex numbers, times e^{i pos theta_i}.
    x (heads, T, hd)."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd)        # (hd/2,)
    angles = positions.double()[:, None] * freqs                          # (T, hd/2)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (hd // 2, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_unpermuted_qk_with_rotate_half_give_the_attention_scores_of_interleaved_rotary():
    torch.manual_seed(0)
    H, Hkv, hd, D, T, theta = 4, 2, 16, 32, 7, 10000.0
    wq, wk, x = torch.randn(H * hd, D), torch.randn(Hkv * hd, D), torch.randn(T, D)
    positions = torch.arange(T)
    # Meta: interleaved weights and interleaved rotary
    q = interleaved_rotary((x @ wq.T).view(T, H, hd).transpose(0, 1), positions, theta)
    k = interleaved_rotary((x @ wk.T).view(T, Hkv, hd).transpose(0, 1), positions, theta)
    meta_scores = q @ k.repeat_interleave(H // Hkv, dim=0).transpose(1, 2)   # (H, T, T)
    # ours: permuted weights and model.py's rotate-half rotary
    cos, sin = rotary_cos_sin(positions[None], hd, theta)
    q = apply_rotary((x @ permute_interleaved_to_half(wq, H).T).view(1, T, H, hd).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ permute_interleaved_to_half(wk, Hkv).T).view(1, T, Hkv, hd).transpose(1, 2), cos, sin)
    our_scores = q[0] @ k[0].repeat_interleave(H // Hkv, dim=0).transpose(1, 2)
    torch.testing.assert_close(our_scores.double(), meta_scores, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- Meta FFN width
def test_meta_hidden_dim_reproduces_the_published_llama_widths():
    assert meta_hidden_dim(4096, 256, None) == 11008      # LLaMA-2 7B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672      # LLaMA-2 70B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336      # LLaMA-3 8B
    assert meta_hidden_dim(576, 256, None) == 1536        # SmolLM2-135M's width


@pytest.mark.parametrize("dim,hidden_dim", [(576, 1536), (64, 128), (64, 172), (64, 300), (4096, 14336), (100, 7)])
def test_meta_ffn_params_give_back_any_hidden_dim(dim, hidden_dim):
    assert meta_hidden_dim(dim, *meta_ffn_params(dim, hidden_dim)) == hidden_dim


# ----------------------------------------------------------------------------- tiny GGUF
def write_gguf(model, path, arch="llama", metadata=None):
    """Our model as a llama.cpp GGUF (float32, q/k rows interleaved as llama.cpp stores them).

    metadata: {key: (value, gguf.GGUFValueType)} written over the model's own values."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
             "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
             "feed_forward.w_gate": "ffn_gate", "feed_forward.w_up": "ffn_up", "feed_forward.w_down": "ffn_down"}
    for name, w in model.state_dict().items():
        if name == "output.weight" and c.tie_embeddings:
            continue
        if name.endswith("wq.weight"):
            w = permute_half_to_interleaved(w, c.n_heads)
        elif name.endswith("wk.weight"):
            w = permute_half_to_interleaved(w, c.n_kv_heads)
        parts = name.removesuffix(".weight").split(".")
        if parts[0] == "layers":
            their = f"blk.{parts[1]}.{names['.'.join(parts[2:])]}.weight"
        else:
            their = f"{names[parts[0]]}.weight"
        writer.add_tensor(their, w.numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_reads_back_to_the_same_weights_and_logits(tmp_path, tied):
    model = random_model(std=0.5, tie_embeddings=tied)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    config, state_dict = read_checkpoint(path)
    assert config == model.config
    assert state_dict.keys() == model.state_dict().keys()
    for name, w in model.state_dict().items():
        assert torch.equal(state_dict[name], w), name
    loaded, tokenizer = load_model(path)
    assert tokenizer is None  # this GGUF carries no vocabulary
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def hf_dir(tmp_path):
    save_hf(random_model(), tmp_path / "hf")
    return tmp_path / "hf"


@contextlib.contextmanager
def raises_naming(path, match):
    """pytest.raises(CheckpointError, match=match) that also wants `path` in the message."""
    with pytest.raises(CheckpointError, match=match) as info:
        yield
    assert str(path) in str(info.value)


def test_unknown_format_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    for path in (tmp_path, tmp_path / "weights.bin"):
        with raises_naming(path, "unknown checkpoint format"):
            load_model(path)
    with raises_naming(tmp_path / "nowhere", "does not exist"):
        read_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("keep", [0.5, 0.01], ids=["in-tensor-data", "in-header"])
def test_truncated_gguf_is_an_error_naming_the_file(tmp_path, keep):
    path = write_gguf(random_model(), tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with raises_naming(path, "not a readable GGUF file .truncated or corrupted"):
        read_checkpoint(path)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = write_gguf(random_model(), tmp_path / "tiny.gguf", arch="gpt2")
    with raises_naming(path, "GGUF architecture 'gpt2' is not supported"):
        read_checkpoint(path)


def test_truncated_safetensors_is_an_error_naming_the_file(hf_dir):
    file = hf_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with raises_naming(file, "cannot read safetensors file .truncated or corrupted"):
        load_model(hf_dir)


def test_corrupted_safetensors_header_is_an_error_naming_the_file(hf_dir):
    file = hf_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts at byte 8
    file.write_bytes(bytes(data))
    with raises_naming(file, "cannot read safetensors file"):
        load_model(hf_dir)


def test_missing_tensor_is_named(hf_dir):
    file = hf_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with raises_naming(hf_dir, r"missing tensor.*'model\.layers\.1\.mlp\.up_proj\.weight' \(our layers\.1\.feed_forward\.w_up\.weight\)"):
        load_model(hf_dir)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.bias",   # not a LLaMA weight
                                  "model.layers.2.mlp.up_proj.weight"],     # a third layer of two
                         ids=["bias", "layer"])
def test_unexpected_tensor_is_named(hf_dir, name):
    file = hf_dir / "model.safetensors"
    save_file({**load_file(file), name: torch.zeros(3)}, file)
    with raises_naming(hf_dir, f"unexpected tensor '{name}'"):
        load_model(hf_dir)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_hf_weight_that_is_not_floating_point_is_an_error_naming_the_tensor_and_dtype(hf_dir, dtype):
    file = hf_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(dtype)
    save_file(tensors, file)
    name = str(dtype).removeprefix("torch.")
    with raises_naming(hf_dir, f"tensor 'model.layers.1.mlp.up_proj.weight' has dtype {name}; "
                               "weights must be float16, bfloat16, float32 or float64"):
        load_model(hf_dir)


def test_meta_weight_that_is_not_floating_point_is_an_error_naming_the_tensor_and_dtype(tmp_path):
    save_meta(random_model(), tmp_path)
    file = tmp_path / "consolidated.00.pth"
    tensors = torch.load(file, weights_only=True)
    tensors["layers.0.attention.wq.weight"] = tensors["layers.0.attention.wq.weight"].to(torch.int32)
    torch.save(tensors, file)
    with raises_naming(tmp_path, "tensor 'layers.0.attention.wq.weight' has dtype int32; weights must be"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_in_any_floating_point_dtype_are_read(hf_dir, dtype):
    file = hf_dir / "model.safetensors"
    save_file({name: t.to(dtype) for name, t in load_file(file).items()}, file)
    config, state_dict = read_checkpoint(hf_dir)
    expected = random_model().state_dict()
    for name, w in state_dict.items():
        assert w.dtype == dtype and torch.equal(w, expected[name].to(dtype)), name


def test_shape_mismatch_names_the_tensor_expected_and_got(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 130}))
    with raises_naming(hf_dir, r"shape mismatch for tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight': "
                               r"expected \((130, 64|64, 130)\) from the config, got \((128, 64|64, 128)\)"):
        load_model(hf_dir)


def test_config_without_a_required_key_is_an_error_naming_the_key(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["num_attention_heads"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with raises_naming(hf_dir / "config.json", "lacks the key 'num_attention_heads'"):
        load_model(hf_dir)


def edit_json(path, **changes):
    """Rewrite a JSON object file with some keys changed."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("key,value,problem", [
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("num_hidden_layers", -2, "num_hidden_layers must be a positive integer, got -2"),
    ("hidden_size", 64.5, "hidden_size must be a positive integer, got 64.5"),
    ("intermediate_size", "128", "intermediate_size must be a positive integer, got '128'"),
    ("vocab_size", 0, "vocab_size must be a positive integer, got 0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer, got 0"),
    ("max_position_embeddings", "64", "max_position_embeddings must be a positive integer, got '64'"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive number, got '1e-5'"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, "rope_theta must be a positive number, got 0"),
    ("rope_parameters", ["default", 10000.0], r"rope_parameters must be a JSON object, got \['default', 10000.0\]"),
])
def test_hf_config_with_a_nonsense_value_is_an_error_naming_the_key(hf_dir, key, value, problem):
    edit_json(hf_dir / "config.json", **{key: value})
    with raises_naming(hf_dir / "config.json", problem):
        load_model(hf_dir)


@pytest.mark.parametrize("key,value,problem", [
    ("n_heads", 0, "n_heads must be a positive integer, got 0"),
    ("dim", "64", "dim must be a positive integer, got '64'"),
    ("n_layers", 2.0, "n_layers must be a positive integer, got 2.0"),
    ("vocab_size", "97", "vocab_size must be a positive integer, got '97'"),
    ("multiple_of", 0, "multiple_of must be a positive integer, got 0"),
    ("ffn_dim_multiplier", "1.3", "ffn_dim_multiplier must be a positive number, got '1.3'"),
    ("ffn_dim_multiplier", 0.001, "hidden_dim must be a positive integer, got 0"),  # int(0.001 * 170) = 0
    ("rope_theta", -1e4, "rope_theta must be a positive number, got -10000.0"),
])
def test_meta_params_with_a_nonsense_value_is_an_error_naming_the_key(tmp_path, key, value, problem):
    save_meta(random_model(), tmp_path)
    edit_json(tmp_path / "params.json", **{key: value})
    with raises_naming(tmp_path / "params.json", problem):
        load_model(tmp_path)


def test_meta_vocab_size_minus_one_without_an_embedding_is_an_error(tmp_path):
    save_meta(random_model(), tmp_path)
    edit_json(tmp_path / "params.json", vocab_size=-1)
    file = tmp_path / "consolidated.00.pth"
    tensors = torch.load(file, weights_only=True)
    del tensors["tok_embeddings.weight"]
    torch.save(tensors, file)
    with raises_naming(tmp_path / "params.json", "vocab_size -1 is read off the embedding, but there is no "
                                                 "2-d tensor 'tok_embeddings.weight'"):
        load_model(tmp_path)


@pytest.mark.parametrize("key,value,vtype,problem", [
    ("attention.head_count", "4", gguf.GGUFValueType.STRING, "must be a positive integer, got '4'"),
    ("feed_forward_length", 0, gguf.GGUFValueType.UINT32, "must be a positive integer, got 0"),
    ("vocab_size", 0, gguf.GGUFValueType.UINT32, "must be a positive integer, got 0"),
    ("rope.freq_base", "1e4", gguf.GGUFValueType.STRING, "must be a positive number, got '1e4'"),
    ("attention.layer_norm_rms_epsilon", -1.0, gguf.GGUFValueType.FLOAT32, "must be a positive number, got -1.0"),
])
def test_gguf_metadata_of_the_wrong_type_is_an_error_naming_the_key(tmp_path, key, value, vtype, problem):
    path = write_gguf(random_model(), tmp_path / "tiny.gguf", metadata={f"llama.{key}": (value, vtype)})
    with raises_naming(path, f"llama.{re.escape(key)} {problem}"):
        load_model(path)


def checkpoint_with(tmp_path, name):
    """A directory holding `name`: a Meta checkpoint for params.json, else an HF one
    (sharded for model.safetensors.index.json)."""
    if name == "params.json":
        save_meta(random_model(), tmp_path)
    else:
        save_hf(random_model(), tmp_path, shard_size=20_000 if name.endswith("index.json") else None)
    return tmp_path


@pytest.mark.parametrize("content,kind", [("[1, 2]", "list"), ('"llama"', "str"), ("7", "int")])
@pytest.mark.parametrize("name", ["config.json", "params.json", "model.safetensors.index.json"])
def test_json_file_that_is_not_an_object_is_an_error_naming_it(tmp_path, name, content, kind):
    (checkpoint_with(tmp_path, name) / name).write_text(content)
    with raises_naming(tmp_path / name, f"expected a JSON object, got {kind}"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "params.json", "model.safetensors.index.json"])
def test_json_file_that_is_not_text_is_an_error_naming_it(tmp_path, name):
    (checkpoint_with(tmp_path, name) / name).write_bytes(b"\xff\xfe{\x00")
    with raises_naming(tmp_path / name, r"as JSON \(damaged\?\)"):
        load_model(tmp_path)


def test_hf_directory_without_weights_is_an_error(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with raises_naming(hf_dir, "neither model.safetensors nor model.safetensors.index.json"):
        load_model(hf_dir)


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_safetensors_index_naming_a_file_outside_the_directory_is_refused_unread(tmp_path, monkeypatch, how):
    save_hf(random_model(), tmp_path / "hf")
    outside = tmp_path / "outside.safetensors"  # valid weights: reading them would succeed
    (tmp_path / "hf" / "model.safetensors").rename(outside)
    name = {"relative": "../outside.safetensors", "absolute": str(outside), "symlink": "model.safetensors"}[how]
    if how == "symlink":
        (tmp_path / "hf" / name).symlink_to("../outside.safetensors")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(load_file(outside), name)}))
    opened = []
    monkeypatch.setattr(checkpoint, "load_file", lambda path: opened.append(path) or load_file(path))
    with raises_naming(index, f"weight_map names '{name}', (a path|which links to {outside},) "
                              f"outside {tmp_path / 'hf'}; refused"):
        load_model(tmp_path / "hf")
    assert opened == []


def test_safetensors_index_may_name_shards_linked_to_the_blobs_of_a_hugging_face_cache(tmp_path):
    """The hub cache keeps each file once in <repo>/blobs/ and links <repo>/snapshots/<rev>/ to it."""
    model = random_model()
    save_hf(model, tmp_path / "saved", shard_size=20_000)
    snapshot = tmp_path / "models--tiny" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--tiny" / "blobs").mkdir()
    for file in (tmp_path / "saved").iterdir():
        file.rename(tmp_path / "models--tiny" / "blobs" / f"blob-{file.name}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob-{file.name}")
    config, state_dict = read_checkpoint(snapshot)
    for name, w in model.state_dict().items():
        assert torch.equal(state_dict[name], w), name


def test_safetensors_index_naming_a_missing_shard_is_an_error_naming_it(tmp_path):
    save_hf(random_model(), tmp_path, shard_size=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with raises_naming(tmp_path / "model.safetensors.index.json",
                       f"weight_map names '{shards[1].name}', which is missing from {tmp_path}"):
        load_model(tmp_path)


def test_safetensors_index_naming_something_that_is_no_file_name_is_an_error(tmp_path):
    save_hf(random_model(), tmp_path, shard_size=20_000)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": 5}}))
    with raises_naming(index, "weight_map names 5, not a file name"):
        load_model(tmp_path)


def test_truncated_meta_checkpoint_is_an_error_naming_the_file(tmp_path):
    save_meta(random_model(), tmp_path)
    file = tmp_path / "consolidated.00.pth"
    file.write_bytes(file.read_bytes()[:2000])
    with raises_naming(file, "cannot read PyTorch checkpoint .truncated or corrupted"):
        load_model(tmp_path)


@pytest.mark.parametrize("content,problem", [
    ([torch.zeros(3)], "got list"),
    ("weights", "got str"),
    ({"tok_embeddings.weight": 5}, "got int for 'tok_embeddings.weight'"),
    ({0: torch.zeros(3)}, "got a dict with the key 0"),
], ids=["list", "str", "int-value", "int-key"])
def test_meta_checkpoint_that_is_not_a_dict_of_tensors_is_an_error(tmp_path, content, problem):
    save_meta(random_model(), tmp_path)
    file = tmp_path / "consolidated.00.pth"
    torch.save(content, file)
    with raises_naming(file, f"expected a dict of tensors by name, {problem}"):
        load_model(tmp_path)


def test_meta_checkpoint_in_the_legacy_format_gives_the_logits_of_the_zip_format(tmp_path):
    model = random_model(std=0.5)
    save_meta(model, tmp_path / "zip")
    shutil.copytree(tmp_path / "zip", tmp_path / "legacy")
    tensors = torch.load(tmp_path / "zip" / "consolidated.00.pth", weights_only=True)
    torch.save(tensors, tmp_path / "legacy" / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy" / "consolidated.00.pth").read_bytes()[:2] != b"PK"  # not a zip file
    from_zip, _ = load_model(tmp_path / "zip")
    from_legacy, _ = load_model(tmp_path / "legacy")
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_legacy(idx)[0], from_zip(idx)[0], atol=0, rtol=0)
        torch.testing.assert_close(from_legacy(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name,damage", [
    ("layers.0.attention.wq.weight", lambda w: w[:, :32]),  # columns: no longer the other shard's
    ("tok_embeddings.weight", lambda w: w[0]),               # 1-d
], ids=["wq-columns", "embedding-1d"])
def test_meta_shards_that_do_not_fit_together_are_an_error_naming_the_tensor(tmp_path, name, damage):
    save_meta(random_model(), tmp_path)
    tensors = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    torch.save(tensors, tmp_path / "consolidated.01.pth")
    tensors[name] = damage(tensors[name]).clone()
    torch.save(tensors, tmp_path / "consolidated.00.pth")
    with raises_naming(tmp_path, f"cannot concatenate the shards of {name!r}: shapes "):
        load_model(tmp_path)


def test_meta_shards_with_a_tensor_name_without_a_dot_is_an_error_naming_it(tmp_path):
    save_meta(random_model(), tmp_path)
    tensors = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    for i in range(2):
        torch.save({"extra": torch.zeros(3), **tensors}, tmp_path / f"consolidated.0{i}.pth")
    with raises_naming(tmp_path, "unexpected tensor 'extra' .no LLaMA weight has that name"):
        load_model(tmp_path)


def test_truncated_legacy_format_meta_checkpoint_is_an_error_naming_the_file(tmp_path):
    save_meta(random_model(), tmp_path)
    file = tmp_path / "consolidated.00.pth"
    torch.save(torch.load(file, weights_only=True), file, _use_new_zipfile_serialization=False)
    file.write_bytes(file.read_bytes()[:-10])
    with raises_naming(file, "cannot read PyTorch checkpoint .truncated or corrupted"):
        load_model(tmp_path)


class Payload:
    """Unpickling this calls os.mkdir(marker): a checkpoint reader must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_meta_checkpoint_carrying_pickled_code_is_refused_without_running_it(tmp_path, zip_format):
    save_meta(random_model(), tmp_path)
    file, marker = tmp_path / "consolidated.00.pth", tmp_path / "payload-ran"
    tensors = torch.load(file, weights_only=True)
    torch.save({**tensors, "norm.weight": Payload(marker)}, file, _use_new_zipfile_serialization=zip_format)
    with raises_naming(file, r"refused: it holds a pickled \w+\.mkdir, not only tensors .unpickling it could run code"):
        load_model(tmp_path)
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.is_dir()


def test_unsupported_hf_variant_is_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_parameters": rope, "mlp_bias": True}))
    with raises_naming(hf_dir / "config.json", "unsupported LLaMA variant: rope_type 'llama3', mlp_bias"):
        load_model(hf_dir)


# ----------------------------------------------------------------------------- failed writes
@contextlib.contextmanager
def without_dac_override():
    """The calling thread without CAP_DAC_OVERRIDE, the capability that lets root write where
    permissions forbid it (Linux capget/capset; restored on exit)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: 2 x 32 bits
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    effective = data[0].effective
    data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE = 1
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = effective
        libc.capset(ctypes.byref(header), data)


@contextlib.contextmanager
def read_only(directory):
    """directory made read-only (chmod 555); for root, whom permissions do not bind, the
    thread also gives up CAP_DAC_OVERRIDE meanwhile, so the refusal is the kernel's."""
    directory.chmod(0o555)
    try:
        with without_dac_override() if os.geteuid() == 0 else contextlib.nullcontext():
            yield
    finally:
        directory.chmod(0o755)


@pytest.mark.parametrize("save,first_file", [
    (save_hf, "model.safetensors"),
    (functools.partial(save_hf, shard_size=20_000), "model-00001-of-*.safetensors"),
    (save_meta, "consolidated.00.pth"),
], ids=["hf", "hf-sharded", "meta"])
def test_save_into_a_read_only_directory_is_an_oserror_naming_the_file_and_changes_nothing(tmp_path, save, first_file):
    save(random_model(seed=0), tmp_path)
    before = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    first_file = next(tmp_path.glob(first_file))
    with read_only(tmp_path), pytest.raises(OSError, match=f"cannot write {re.escape(str(first_file))}: "
                                                           "Permission denied"):
        save(random_model(seed=1), tmp_path)
    assert {file.name: file.read_bytes() for file in tmp_path.iterdir()} == before


@pytest.mark.parametrize("shard_size", [None, 20_000], ids=["single", "sharded"])
def test_save_hf_writes_config_json_last(tmp_path, monkeypatch, shard_size):
    written = []  # names in the order their files take their place (atomic_write's rename)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda tmp, path: written.append(Path(path).name) or real_replace(tmp, path))
    save_hf(random_model(), tmp_path, shard_size=shard_size)
    assert written[-1] == "config.json" and len(written) == len(list(tmp_path.iterdir()))
    assert ("model.safetensors.index.json" in written) == (shard_size is not None)


# ----------------------------------------------------------------------------- tokenizers
def test_meta_directory_with_llama3_tokenizer_model_loads_that_tokenizer(tmp_path):
    save_meta(random_model(vocab_size=128256, tie_embeddings=True), tmp_path)
    shutil.copy(assets.fetch("llama3-tokenizer"), tmp_path / "tokenizer.model")
    _, tokenizer = load_model(tmp_path)
    assert tokenizer is not None and tokenizer.n_vocab == 128256
    assert tokenizer.encode("hello world") == [15339, 1917]


def test_sentencepiece_tokenizer_model_gives_no_tokenizer(hf_dir):
    (hf_dir / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # protobuf
    assert not is_tiktoken_file(hf_dir / "tokenizer.model")
    _, tokenizer = load_model(hf_dir)
    assert tokenizer is None


def test_required_tokenizer_that_is_not_there_is_one_line_listing_the_files_searched(hf_dir):
    (hf_dir / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(CheckpointError) as info:
        load_model(hf_dir, require_tokenizer=True)
    assert str(info.value) == (
        f"{hf_dir}: no tokenizer found; searched {hf_dir / 'tokenizer.json'} (absent); "
        f"{hf_dir / 'tokenizer.model'} (not a tiktoken BPE file: SentencePiece is not supported); "
        f"{hf_dir / 'original' / 'tokenizer.model'} (absent)")


def test_required_tokenizer_of_a_gguf_without_vocabulary_is_an_error(tmp_path):
    path = write_gguf(random_model(), tmp_path / "tiny.gguf")
    with raises_naming(path, "no tokenizer found; searched .*tiny.gguf .no tokenizer.ggml.tokens"):
        load_model(path, require_tokenizer=True)


def test_a_foreign_architecture_or_broken_config_is_named_before_the_missing_tokenizer(tmp_path, hf_dir):
    """Neither has a tokenizer either: the one-line message must be about the real problem."""
    gguf_path = write_gguf(random_model(), tmp_path / "gpt2.gguf", arch="gpt2")
    config = json.loads((hf_dir / "config.json").read_text())
    foreign = tmp_path / "foreign"
    shutil.copytree(hf_dir, foreign)
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (hf_dir / "config.json").write_text("{broken")
    for path, problem in ((gguf_path, "GGUF architecture 'gpt2' is not supported"),
                          (foreign, "model_type 'gpt2' is not supported"),
                          (hf_dir, "config.json as JSON (damaged?)")):
        with pytest.raises(CheckpointError) as info:
            load_model(path, require_tokenizer=True)
        assert problem in str(info.value) and "\n" not in str(info.value), str(info.value)


# byte-level BPE of three tokens: 'a', 'b' and their merge 'ab'
TINY_BPE = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "decoder": {"type": "ByteLevel"}, "added_tokens": [],
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}


@pytest.mark.parametrize("spec", [
    [1, 2],
    {**TINY_BPE, "added_tokens": [{"id": 5}]},
    {**TINY_BPE, "model": {**TINY_BPE["model"], "vocab": ["a", "b", "ab"]}},
    {**TINY_BPE, "model": {**TINY_BPE["model"], "merges": [5]}},
], ids=["list", "added-token-without-content", "vocab-list", "merge-int"])
def test_damaged_tokenizer_json_is_a_checkpoint_error_naming_it(hf_dir, spec):
    (hf_dir / "tokenizer.json").write_text(json.dumps(TINY_BPE))
    assert load_model(hf_dir)[1].encode("ab") == [2]  # the undamaged file is a tokenizer
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    with raises_naming(hf_dir / "tokenizer.json", r"cannot build a tokenizer from it \(damaged\?\)"):
        load_model(hf_dir)


def test_tokenizer_config_json_that_is_not_an_object_is_an_error_naming_it(hf_dir):
    (hf_dir / "tokenizer.json").write_text(json.dumps(TINY_BPE))
    (hf_dir / "tokenizer_config.json").write_text("[]")
    with raises_naming(hf_dir / "tokenizer_config.json", "expected a JSON object, got list"):
        load_model(hf_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer_files(tmp_path_factory):
    """SmolLM2's tokenizer.json and tokenizer_config.json, written as plain JSON from the
    GGUF's vocabulary ("a b" merges, as GGUF and older tokenizer.json files spell them)."""
    fields = gguf.GGUFReader(assets.fetch("smollm2-135m-instruct")).fields
    tokens, kinds = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    spec = {
        "added_tokens": [{"id": i, "content": t, "special": True}
                         for i, (t, k) in enumerate(zip(tokens, kinds)) if k == gguf.TokenType.CONTROL],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": fields["tokenizer.ggml.merges"].contents()},
    }
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "chat_template": fields["tokenizer.chat_template"].contents()}
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def with_tokenizer_files(directory, tokenizer_files):
    for file in tokenizer_files.iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def test_hf_directory_with_tokenizer_json_loads_that_tokenizer(tmp_path, smollm2_tokenizer_files):
    model = random_model(vocab_size=49152, tie_embeddings=True)
    save_hf(model, tmp_path)
    loaded, tokenizer = load_model(with_tokenizer_files(tmp_path, smollm2_tokenizer_files), require_tokenizer=True)
    assert tokenizer.n_vocab == 49152 and tokenizer.chat_format == "chatml"
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_ids) == (1, 2, 2, {0, 2})
    chat = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(chat).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat[-4:] == [1, 520, 9531, 198] and tokenizer.decode(chat[-4:]) == "<|im_start|>assistant\n"
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name


def test_tokenizer_json_is_preferred_to_a_tiktoken_tokenizer_model(tmp_path, smollm2_tokenizer_files):
    save_hf(random_model(vocab_size=128256, tie_embeddings=True), tmp_path)
    with_tokenizer_files(tmp_path, smollm2_tokenizer_files)
    (tmp_path / "original").mkdir()
    shutil.copy(assets.fetch("llama3-tokenizer"), tmp_path / "original" / "tokenizer.model")
    assert load_model(tmp_path)[1].n_vocab == 49152  # SmolLM2's tokenizer.json
    (tmp_path / "tokenizer.json").unlink()
    assert load_model(tmp_path)[1].n_vocab == 128256  # LLaMA-3's original/tokenizer.model


def test_tokenizer_with_more_ids_than_the_embedding_is_an_error(hf_dir, smollm2_tokenizer_files):
    with raises_naming(hf_dir, "the tokenizer .* has 49152 ids but the model's embedding only 97 rows"):
        load_model(with_tokenizer_files(hf_dir, smollm2_tokenizer_files))


def test_sentencepiece_style_tokenizer_json_is_a_checkpoint_error_naming_it(hf_dir):
    spec = {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": None, "added_tokens": [],
            "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "\u2581": 1, "a": 2, "\u2581a": 3}, "merges": ["\u2581 a"]}}
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    with raises_naming(hf_dir / "tokenizer.json", "SentencePiece-style tokenizer.*is not supported; supported:"):
        load_model(hf_dir)
