"""Our Transformer, loaded by our checkpoint readers, against transformers' LlamaForCausalLM.

A tiny random LLaMA with grouped-query attention is built in transformers and written the
way transformers writes it (safetensors, one file or sharded) or the way Meta writes it
(consolidated.NN.pth, q/k rows in the interleaved rotary layout). Loaded with our
`load_model`, it must give transformers' logits and loss (float32, 1e-5).
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from loranull_mini.checkpoint import load_model, save_hf, save_meta  # noqa: E402

HF_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=64,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
N_HEADS, N_KV_HEADS, HEAD_DIM = 4, 2, 16
TOL = dict(atol=1e-5, rtol=1e-5)


def random_hf_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """Random weights of O(1) effect (norm weights too), so a swapped tensor shows in logits."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**HF_TINY, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf_model(request):
    return random_hf_llama(tied=request.param)


@pytest.fixture
def tokens():
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours, hf, tokens):
    with torch.no_grad():
        expected = hf(tokens).logits
        logits, _ = ours(tokens)
    torch.testing.assert_close(logits, expected, **TOL)


# ----------------------------------------------------------------------------- HF safetensors
def test_hf_safetensors_checkpoint_gives_transformers_logits(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours, tokenizer = load_model(tmp_path)
    assert tokenizer is None  # no tokenizer we can build is stored with it
    assert (ours.output.weight is ours.tok_embeddings.weight) == hf_model.config.tie_word_embeddings
    assert_same_logits(ours, hf_model, tokens)


def test_sharded_hf_checkpoint_gives_transformers_logits(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path)
    assert_same_logits(ours, hf_model, tokens)


def test_loss_equals_transformers_loss_with_ignored_labels_and_loss_mask(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    labels = tokens.clone()
    labels[0, 3:7] = -100                       # transformers' way to leave positions out
    with torch.no_grad():
        expected = hf_model(tokens, labels=labels).loss
        # transformers shifts labels inside; our targets[:, t] is the token after tokens[:, t]
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        _, loss_ignore = ours(tokens, targets)
        loss_mask = (targets != -100).long()    # the same positions through loss_mask
        _, loss_masked = ours(tokens, torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1), loss_mask)
    torch.testing.assert_close(loss_ignore, expected, **TOL)
    torch.testing.assert_close(loss_masked, expected, **TOL)


@pytest.mark.parametrize("shard_size", [None, 20_000], ids=["one-file", "sharded"])
def test_save_hf_is_read_by_transformers_with_the_same_logits(hf_model, tokens, tmp_path, shard_size):
    hf_model.save_pretrained(tmp_path / "theirs")
    ours, _ = load_model(tmp_path / "theirs")
    save_hf(ours, tmp_path / "ours", shard_size=shard_size)
    if shard_size:
        assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 1
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert_same_logits(ours, reloaded, tokens)
    assert_same_logits(ours, hf_model, tokens)


# ----------------------------------------------------------------------------- Meta
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def to_interleaved(w, n_heads):
    """Rotate-half rows -> interleaved rows, written as an index list (independent of the
    reshape in checkpoint.py): interleaved row 2i+c of a head is rotate-half row i + c*hd/2."""
    half = HEAD_DIM // 2
    rows = [h * HEAD_DIM + (j // 2) + (j % 2) * half for h in range(n_heads) for j in range(HEAD_DIM)]
    return w[rows]


def meta_tensors(hf_model) -> dict:
    """The HF weights under Meta's names, q/k rows in Meta's interleaved rotary layout."""
    tensors = {}
    for name, w in hf_model.state_dict().items():
        if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        for hf_part, meta_part in HF_TO_META.items():
            name = name.replace(hf_part, meta_part)
        name = name.removeprefix("model.")
        if name.endswith("attention.wq.weight"):
            w = to_interleaved(w, N_HEADS)
        elif name.endswith("attention.wk.weight"):
            w = to_interleaved(w, N_KV_HEADS)
        tensors[name] = w.clone()
    return tensors


# Meta's FeedForward gives int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 4: 172.
META_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=4,
                   ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=100000.0)


def split_like_meta(tensors: dict, n: int) -> list[dict]:
    """Model-parallel shards as LLaMA-2's fairscale layers store them."""
    shards = [{} for _ in range(n)]
    for name, w in tensors.items():
        if any(k in name for k in ("wq", "wk", "wv", "w1", "w3", "output")):
            parts = w.tensor_split(n, dim=0)   # column-parallel: output rows
        elif any(k in name for k in ("wo", "w2", "tok_embeddings")):
            parts = w.tensor_split(n, dim=1)   # row-parallel / ParallelEmbedding: columns
        else:
            parts = [w] * n                    # norms: replicated
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_with_interleaved_qk_gives_transformers_logits(hf_model, tokens, tmp_path, n_shards):
    for i, shard in enumerate(split_like_meta(meta_tensors(hf_model), n_shards)):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    ours, _ = load_model(tmp_path)
    assert ours.config.hidden_dim == 172
    assert (ours.output.weight is ours.tok_embeddings.weight) == hf_model.config.tie_word_embeddings
    assert_same_logits(ours, hf_model, tokens)


def test_meta_vocab_size_minus_one_is_read_off_the_embedding(tokens, tmp_path):
    hf_model = random_hf_llama(tied=False)
    torch.save(meta_tensors(hf_model), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({**META_PARAMS, "vocab_size": -1}))  # LLaMA-2
    ours, _ = load_model(tmp_path)
    assert ours.config.vocab_size == 97
    assert_same_logits(ours, hf_model, tokens)


def test_save_meta_writes_interleaved_qk_and_reloads_to_the_same_logits(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    save_meta(ours, tmp_path / "meta")
    written = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    expected = meta_tensors(hf_model)
    assert written.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(written[name], expected[name], atol=0, rtol=0)
    reloaded, _ = load_model(tmp_path / "meta")
    assert_same_logits(reloaded, hf_model, tokens)
