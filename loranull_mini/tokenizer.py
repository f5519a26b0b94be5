"""Tokenizers for the real checkpoints, built on `tiktoken.Encoding` (no transformers, no network).

Three sources of a byte-level BPE vocabulary:
  - a GGUF file's metadata (SmolLM2: GPT-2-style BPE, 49152 tokens, ChatML chat template);
  - LLaMA-3's `tokenizer.model`, a tiktoken BPE file ("base64(token bytes) rank" per line);
  - an HF checkpoint's `tokenizer.json` (+ `tokenizer_config.json` for bos/eos/pad and the
    chat template), when it is byte-level BPE (GPT-2, LLaMA-3, SmolLM2 and the like).
SentencePiece tokenizers (LLaMA-1/2, Mistral) are not supported.

tiktoken's BPE repeatedly joins the adjacent pair of byte strings whose joined bytes have
the lowest rank, and a token's id is its rank. GGUF and tokenizer.json list merges instead;
the two agree when the ids of the tokens the merges make never fall along the list, so that
id == rank (checked when a file is read, see _check_ranks_follow_merges).

    tok = Tokenizer.from_gguf(path)             # or from_hf_json(folder), from_llama3(file)
    tok.encode("The capital of France is")        # [504, 3575, 282, 4649, 314]
    tok.encode_chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import regex  # tiktoken's own dependency; \p{L} classes for the rare slow path
import tiktoken

# SmolLM2 (tokenizer.json: Digits(individual_digits) then GPT-2's ByteLevel regex), as one
# regex: each digit alone; whitespace before a digit is its own piece, as it is when the
# digits are split off first.
SMOLLM_PATTERN = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"
                  r"|\s+(?=\p{N})|\s+(?!\S)|\s+")
# GGUF `tokenizer.ggml.pre` -> split pattern. Only the one we can test is listed.
GGUF_SPLIT_PATTERNS = {"smollm": SMOLLM_PATTERN}
# GPT-2 (tokenizer.json: a plain ByteLevel pre-tokenizer with use_regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# LLaMA-3 (llama_models/llama3/tokenizer.py): numbers in groups of up to 3 digits.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Its 256 special tokens take ids 128000.. in this order (llama_models 0.3.0).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>"
                          for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))]

# Chat formats we can write, recognised by a token their jinja template uses.
#   format: (token that marks it in the template, special tokens it needs, the token that
#            closes a message, tokens at which generation stops besides eos)
CHAT_FORMATS = {
    "chatml": ("<|im_start|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<|endoftext|>",)),
    "llama3": ("<|start_header_id|>",
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|eot_id|>", ("<|eom_id|>", "<|end_of_text|>")),
}
SUPPORTED = ("supported: a byte-level BPE tokenizer.json (GPT-2, LLaMA-3, SmolLM2 style), "
             "LLaMA-3's tiktoken tokenizer.model, or a GGUF with a 'gpt2' vocabulary")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: GGUF/HF vocabularies spell token bytes
    with it (e.g. the space byte 0x20 is written 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. move to 256, 257, ...
            table[b], shift = chr(256 + shift), shift + 1
    return table


class Tokenizer:
    """Byte-level BPE tokenizer: text <-> token ids, plus the model's chat template."""

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int],
                 special_tokens: dict[str, int], *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, end_of_turn_id: int, stop_ids: set[int],
                 chat_format: str | None, default_system_prompt: str | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.end_of_turn_id = end_of_turn_id   # closes a chat message; a trained answer ends with it
        self.stop_ids = set(stop_ids)          # generation stops at any of these
        self.add_bos = add_bos                 # does the model's own tokenizer put bos before text
        self.chat_format = chat_format         # "chatml", "llama3" or None
        self.default_system_prompt = default_system_prompt
        self.chat_template = chat_template     # the jinja source, when the file carries one
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_tokens)
        self.n_vocab = self._enc.n_vocab
        self._ranks = mergeable_ranks
        self._split = regex.compile(pat_str)
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        # Single bytes that are not tokens. tiktoken cannot encode them (it panics with a
        # pyo3 PanicException, a BaseException); the reference BPE drops them. SmolLM2 lacks
        # 21: 0x04 0x06 0x13 0x14 0x16 0x1d 0xc0 0xc1 0xf1 0xf2 0xf5-0xff.
        single = {t[0] for t in mergeable_ranks if len(t) == 1}
        self.missing_bytes = bytes(b for b in range(256) if b not in single)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """A GGUF file (by its magic) or else a LLaMA-3 tiktoken `tokenizer.model`."""
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        return cls.from_gguf(path) if is_gguf else cls.from_llama3(path)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """SmolLM2's tokenizer from a GGUF file's metadata (tensors are not read).

        `path` may also be an open `gguf.GGUFReader`, to parse the file only once.
        """
        import gguf  # only needed here (not installed on every machine)

        if isinstance(path, gguf.GGUFReader):
            reader, path = path, Path(path.data.filename)  # data is the file's np.memmap
        else:
            path = Path(path)
            reader = _open_gguf(path)

        def meta(key, default=KeyError):
            if key in reader.fields:
                return reader.fields[key].contents()
            if default is KeyError:
                raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
            return default

        if meta("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer {meta('tokenizer.ggml.model')!r} is not supported "
                             "(only GPT-2-style byte-level BPE, 'gpt2')")
        pre = meta("tokenizer.ggml.pre", "default")
        if pre not in GGUF_SPLIT_PATTERNS:
            raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported "
                             f"(known: {', '.join(GGUF_SPLIT_PATTERNS)})")
        tokens, kinds = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
        special_kinds = {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        special, ranks = {}, {}
        try:
            for i, (token, kind) in enumerate(zip(tokens, kinds)):
                if kind in special_kinds:     # <|endoftext|>, <|im_start|>, ...: never merged
                    special[token] = i
                else:                         # 'Ġthe' -> b' the'
                    ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError as e:
            raise ValueError(f"{path}: token {token!r} is not byte-level BPE ({e})") from None
        merges = [_merge_pair(path, m, byte_of) for m in meta("tokenizer.ggml.merges")]
        _check_ranks_follow_merges(path, ranks, merges)

        template = meta("tokenizer.chat_template", None)
        chat_format, system = _chat_format(path, template, special)
        bos, eos, pad = (meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding"))
        end_of_turn, stop_ids = _turn_ids(chat_format, special, eos)
        return cls(path.name, GGUF_SPLIT_PATTERNS[pre], ranks, special,
                   bos_id=bos, eos_id=eos, pad_id=pad,
                   end_of_turn_id=end_of_turn, stop_ids=stop_ids,
                   chat_format=chat_format, default_system_prompt=system,
                   add_bos=bool(meta("tokenizer.ggml.add_bos_token", False)),
                   chat_template=template)

    @classmethod
    def from_hf_json(cls, path) -> "Tokenizer":
        """A byte-level BPE `tokenizer.json` (transformers' "fast" tokenizer file).

        `path` is the file or the folder that holds it. From the same folder,
        `tokenizer_config.json` gives bos/eos/pad, add_bos_token and the chat template
        (or `chat_template.jinja`, where newer transformers save it).
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        spec = _read_json(file)
        config_file = file.parent / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        model = _byte_level_bpe(file, spec)
        pattern = _hf_split_pattern(file, spec.get("pre_tokenizer"))

        # Added tokens (<|endoftext|>, <|eot_id|>, ...) are tiktoken's special tokens; they
        # never take part in merges, even where the vocabulary lists them too.
        special = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        special_ids = set(special.values())
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {}
        for token, i in model["vocab"].items():
            if i not in special_ids:
                ranks[_token_bytes(file, token, byte_of)] = i  # 'Ġthe' -> b' the'
        merges = [_merge_pair(file, m, byte_of) for m in model.get("merges") or []]
        _check_ranks_follow_merges(file, ranks, merges)

        def token_id(key):  # "<|im_end|>" or {"content": "<|im_end|>", ...} or null
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is None:
                return None
            if value not in special and value not in model["vocab"]:
                raise ValueError(f"{config_file}: {key} {value!r} is not a token of {file}")
            return special.get(value, model["vocab"].get(value))

        # bos: tokenizer_config.json, else the token the post-processor puts before text.
        prepended = _prepended_token(spec.get("post_processor"))
        bos = token_id("bos_token")
        bos = prepended if bos is None else bos
        eos = token_id("eos_token")
        pad = token_id("pad_token")
        add_bos = config.get("add_bos_token")
        add_bos = bool(add_bos) if add_bos is not None else (bos is not None and prepended == bos)

        template = _hf_chat_template(file.parent, config)
        chat_format, system = _chat_format(file, template, special)
        end_of_turn, stop_ids = _turn_ids(chat_format, special, eos)
        return cls(f"{file.parent.name}/{file.name}", pattern, ranks, special,
                   bos_id=bos, eos_id=eos,
                   pad_id=pad if pad is not None else eos,  # padding is masked: any id will do
                   end_of_turn_id=end_of_turn, stop_ids=stop_ids,
                   chat_format=chat_format, default_system_prompt=system,
                   add_bos=add_bos, chat_template=template)

    @classmethod
    def from_llama3(cls, path) -> "Tokenizer":
        """LLaMA-3's tiktoken BPE file plus its 256 special tokens and chat format."""
        path = Path(path)
        ranks = _read_tiktoken_file(path)
        n = len(ranks)  # 128000: the special tokens follow the mergeable ones
        special = {token: n + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(path.name, LLAMA3_PATTERN, ranks, special,
                   bos_id=special["<|begin_of_text|>"], eos_id=special["<|end_of_text|>"],
                   pad_id=special["<|finetune_right_pad_id|>"],
                   end_of_turn_id=special["<|eot_id|>"],
                   stop_ids={special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")},
                   chat_format="llama3", add_bos=True)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, *, bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. allow_special: "<|im_end|>" etc. in the text become their
        special ids; otherwise they are ordinary text. bos: prepend bos_id."""
        if bos and self.bos_id is None:
            raise ValueError(f"{self.name} has no bos token")
        ids = [self.bos_id] if bos else []
        if not allow_special:
            return ids + self._encode_ordinary(text)
        # re.split with one capturing group: odd entries are the special tokens themselves
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_ordinary(part)
        return ids

    def decode(self, ids) -> str:
        """Text of token ids (a list, or a 1-D tensor); invalid UTF-8 becomes U+FFFD."""
        return self._enc.decode([int(i) for i in ids])

    def _encode_ordinary(self, text: str) -> list[int]:
        raw = text.encode("utf-8", "surrogatepass")
        if not self.missing_bytes or len(raw.translate(None, self.missing_bytes)) == len(raw):
            return self._enc.encode_ordinary(text)  # the fast path: every byte is a token
        return self._encode_dropping_missing_bytes(text)

    def _encode_dropping_missing_bytes(self, text: str) -> list[int]:
        """What the reference BPE (HF tokenizers, no unk token) does with bytes that are not
        tokens: split the text into pieces first, then drop those bytes from each piece and
        merge what is left, so "!\\x04!" is one piece "!!" (id 10095 for SmolLM2)."""
        ids = []
        for piece in self._split.findall(text):
            kept = piece.encode("utf-8").translate(None, self.missing_bytes)
            if kept:
                ids += self._bpe(kept)
        return ids

    def _bpe(self, piece: bytes) -> list[int]:
        """Byte-pair merging of one piece, the algorithm tiktoken runs in Rust: join the
        adjacent pair whose joined bytes have the lowest rank, until no pair is a token."""
        if piece in self._ranks:
            return [self._ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            rank, i = min((self._ranks.get(a + b, float("inf")), i)
                          for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self._ranks[p] for p in parts]

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model saw it in training (special tokens as text)."""
        return "".join(text for text, _ in self._chat_parts(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = []
        for text, is_template in self._chat_parts(messages, add_generation_prompt):
            ids += self.encode(text, allow_special=is_template)
        return ids

    def _chat_parts(self, messages, add_generation_prompt) -> list[tuple[str, bool]]:
        """[(text, is_template)]; message contents that are encoded on their own have
        is_template False (their special-token text stays plain text)."""
        if self.chat_format == "chatml":
            # SmolLM2's jinja template, whose output HF tokenizes as one string:
            # [<|im_start|>system\n{default}<|im_end|>\n if the first message is not a
            # system one] + <|im_start|>{role}\n{content}<|im_end|>\n per message
            # [+ <|im_start|>assistant\n]. Contents are not stripped.
            parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
            if messages and messages[0]["role"] != "system" and self.default_system_prompt:
                parts.insert(0, f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
            if add_generation_prompt:
                parts.append("<|im_start|>assistant\n")
            return [(p, True) for p in parts]
        if self.chat_format == "llama3":
            # llama_models' ChatFormat.encode_dialog_prompt: bos, then per message a header,
            # the content encoded on its own (not stripped), <|eot_id|>; no system default.
            def header(role):
                role = "ipython" if role == "tool" else role
                return (f"<|start_header_id|>{role}<|end_header_id|>\n\n", True)
            parts = [("<|begin_of_text|>", True)]
            for m in messages:
                parts += [header(m["role"]), (m["content"], False), ("<|eot_id|>", True)]
            if add_generation_prompt:
                parts.append(header("assistant"))
            return parts
        found = "has no chat template" if self.chat_template is None else "has a chat template that is"
        raise ValueError(f"{self.name} {found} neither ChatML (<|im_start|>) nor LLaMA-3 "
                         "(<|start_header_id|>): encode_chat cannot format a conversation for it")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, chat={self.chat_format})"


def _open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return gguf.GGUFReader(path)  # memory-maps the file; reads metadata and tensor info
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _check_ranks_follow_merges(path, ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> None:
    """Require a vocabulary whose merge list tiktoken reproduces with rank == id.

    GGUF and tokenizer.json BPE apply merges in list order; tiktoken joins the adjacent
    pair whose joined bytes have the lowest rank (= id). They agree when
      1. every merge joins two tokens into a token;
      2. the ids of the tokens the merges make never fall along the list (a vocabulary
         converted from tiktoken, like LLaMA-3's, lists every split of a token in a row,
         all making the same id; a GPT-2-style one makes ids 256, 257, ... in order);
      3. every token longer than one byte is made by some merge (tiktoken would make it
         wherever its bytes meet; the merge list never would).
    These are necessary, not sufficient: tiktoken also joins the halves of a token's other
    splits when they meet, which a merge list with one split per token (GPT-2 style) does
    not. Converted tiktoken vocabularies list every split; for SmolLM2 the tests compare
    with the reference BPE on real text.
    """
    made = []
    for a, b in merges:
        if a not in ranks or b not in ranks or a + b not in ranks:
            raise ValueError(f"{path}: merge {a!r} + {b!r} does not join two tokens into a token")
        made.append(ranks[a + b])
    falls = next((i for i in range(1, len(made)) if made[i] < made[i - 1]), None)
    if falls is not None:
        raise ValueError(f"{path}: token ids do not follow the merge order (merge {falls} makes "
                         f"id {made[falls]} after merge {falls - 1} made id {made[falls - 1]}); "
                         "tiktoken ranks merges by the id they make, so it cannot express this "
                         "vocabulary")
    made = set(made)
    unmade = [t for t, i in ranks.items() if len(t) > 1 and i not in made]
    if unmade:
        raise ValueError(f"{path}: {len(unmade)} multi-byte token(s) are made by no merge, "
                         f"e.g. {unmade[0]!r}; tiktoken cannot express this vocabulary")


def _token_bytes(path, token: str, byte_of: dict[str, int]) -> bytes:
    """A byte-level token's bytes: 'Ġthe' -> b' the' (GPT-2's bytes_to_unicode spelling)."""
    try:
        return bytes(byte_of[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{path}: token {token!r} is not byte-level BPE (character {e}); "
                         f"{SUPPORTED}") from None


def _merge_pair(path, merge, byte_of) -> tuple[bytes, bytes]:
    """One merge, written "Ġ t" (GGUF, older tokenizer.json) or ["Ġ", "t"], as bytes."""
    pair = merge.split(" ") if isinstance(merge, str) else merge
    if len(pair) != 2:
        raise ValueError(f"{path}: merge {merge!r} is not a pair of tokens")
    return _token_bytes(path, pair[0], byte_of), _token_bytes(path, pair[1], byte_of)


def _chat_format(path, template: str | None, special: dict[str, int]) -> tuple[str | None, str | None]:
    """(chat format, default system prompt) recognised from a jinja chat template's text.

    The system prompt is the one a ChatML template (SmolLM2's) adds when the conversation
    starts without a system message; None when the template has none.
    """
    chat_format = next((name for name, (marker, *_) in CHAT_FORMATS.items()
                        if template and marker in template), None)
    if chat_format is None:
        return None, None
    lacking = [t for t in CHAT_FORMATS[chat_format][1] if t not in special]
    if lacking:
        raise ValueError(f"{path}: the chat template is {chat_format} but the vocabulary lacks "
                         f"the special token(s) {', '.join(lacking)}")
    if chat_format != "chatml":
        return chat_format, None
    # SmolLM2's template adds a system message when the conversation has none: a literal
    # '<|im_start|>system\n...<|im_end|>'. Text built from jinja ({{ }}, ' + x + ') is the
    # conversation's own system message, not a default.
    system = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template)
    if system is None or re.search(r"[{}]|['\"]\s*\+|\+\s*['\"]", system.group(1)):
        return chat_format, None
    return chat_format, system.group(1)


def _turn_ids(chat_format: str | None, special: dict[str, int], eos: int | None):
    """(end_of_turn_id, stop_ids): the token that closes a message, and every token that
    ends generation (eos and the chat format's own)."""
    if chat_format is None:
        return eos, {eos} - {None}
    _, _, end_of_turn, stops = CHAT_FORMATS[chat_format]
    return special[end_of_turn], {eos, special[end_of_turn], *map(special.get, stops)} - {None}


# ----------------------------------------------------------------------------- tokenizer.json
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None


def _steps(component: dict | None, key: str) -> list[dict]:
    """A tokenizer.json component as a flat list of steps ({"type": "Sequence", key: [...]})."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [step for c in component[key] for step in _steps(c, key)]
    return [component]


def _byte_level_bpe(file: Path, spec: dict) -> dict:
    """tokenizer.json's "model" after checking it is byte-level BPE with nothing else that
    changes the ids (no normalizer, no word prefixes or suffixes)."""
    model = spec.get("model") or {}
    kind = model.get("type", "BPE" if "merges" in model else None)
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(spec.get("pre_tokenizer"), "pretokenizers"))
    if kind != "BPE" or not byte_level:
        what = (f"a {kind} model" if kind != "BPE" else
                "BPE without a ByteLevel pre-tokenizer (a SentencePiece-style tokenizer)")
        raise ValueError(f"{file}: {what} is not supported; {SUPPORTED}")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{file}: a normalizer ({spec['normalizer'].get('type')}) is not supported; {SUPPORTED}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{file}: BPE with a {key} is not supported; {SUPPORTED}")
    return model


def _hf_split_pattern(file: Path, pre_tokenizer: dict | None) -> str:
    """The one regex that splits text as tokenizer.json's pre-tokenizer does.

    ByteLevel(use_regex)                                  -> GPT-2's pattern
    Sequence[Digits(individual_digits), ByteLevel(use_regex)]      -> SmolLM2's
    Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)]   -> that regex (LLaMA-3)
    """
    steps = _steps(pre_tokenizer, "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space"):
        byte_level_regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and byte_level_regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
            return SMOLLM_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not byte_level_regex and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            try:
                return regex.compile(split["pattern"]["Regex"]).pattern
            except regex.error as e:
                raise ValueError(f"{file}: the Split regex does not compile: {e}") from None
    raise ValueError(
        f"{file}: pre-tokenizer {json.dumps(pre_tokenizer)[:300]} is not supported; supported: "
        "ByteLevel(use_regex=true) (GPT-2), Sequence[Digits(individual_digits=true), "
        "ByteLevel(use_regex=true)] (SmolLM2), Sequence[Split(Regex, Isolated), "
        "ByteLevel(use_regex=false)] (LLaMA-3), all without add_prefix_space")


def _prepended_token(post_processor: dict | None) -> int | None:
    """The id a TemplateProcessing post-processor puts before a single text (LLaMA-3's
    <|begin_of_text|>), or None."""
    for step in _steps(post_processor, "processors"):
        first = (step.get("single") or [{}])[0] if step.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            ids = step["special_tokens"][first["SpecialToken"]["id"]]["ids"]
            return ids[0] if len(ids) == 1 else None
    return None


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """The jinja chat template: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of named templates: the "default" one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} from lines 'base64(token bytes) rank'."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        raise ValueError(f"{path}: not a tiktoken BPE file "
                         f"('base64(token) rank' per line); bad line {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks
