"""Tokenizers for the real checkpoints, built on `tiktoken.Encoding` (no transformers, no network).

Two sources of a byte-level BPE vocabulary:
  - a GGUF file's metadata (SmolLM2: GPT-2-style BPE, 49152 tokens, ChatML chat template);
  - LLaMA-3's `tokenizer.model`, a tiktoken BPE file ("base64(token bytes) rank" per line).

tiktoken's BPE repeatedly joins the adjacent pair of byte strings whose joined bytes have
the lowest rank. A GPT-2-style vocabulary lists merges instead; the two agree when token
ids rise in merge order, so that id == rank (checked when a GGUF is read).

    tok = Tokenizer.from_gguf(path)
    tok.encode("The capital of France is")        # [504, 3575, 282, 4649, 314]
    tok.encode_chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import base64
import binascii
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
        _check_ids_follow_merges(path, ranks, meta("tokenizer.ggml.merges"), byte_of)

        template = meta("tokenizer.chat_template", None)
        chatml = template is not None and "<|im_start|>" in template
        # SmolLM2's template adds a system message when the conversation has none.
        system = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template or "")
        bos, eos, pad = (meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding"))
        end_of_turn = special.get("<|im_end|>", eos)
        return cls(path.name, GGUF_SPLIT_PATTERNS[pre], ranks, special,
                   bos_id=bos, eos_id=eos, pad_id=pad,
                   end_of_turn_id=end_of_turn,
                   stop_ids={i for i in (eos, end_of_turn, special.get("<|endoftext|>"))
                             if i is not None},
                   chat_format="chatml" if chatml else None,
                   default_system_prompt=system.group(1) if system else None,
                   add_bos=bool(meta("tokenizer.ggml.add_bos_token", False)),
                   chat_template=template)

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
        raise ValueError(f"{self.name}: no supported chat template")

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


def _check_ids_follow_merges(path, ranks: dict[bytes, int], merges: list[str], byte_of) -> None:
    """tiktoken ranks pairs by the id of their joined token; a GGUF vocabulary ranks them by
    their position in `merges`. Require ids that rise in merge order, so both agree."""
    joined = [ranks.get(bytes(byte_of[c] for c in m.replace(" ", ""))) for m in merges]
    if None in joined or any(a >= b for a, b in zip(joined, joined[1:])):
        raise ValueError(f"{path}: token ids do not follow the merge order; "
                         "id == rank does not hold for this vocabulary")


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
