"""Meta's tokenizers, chosen by what tokenizer.model contains: a SentencePiece model (Llama 1/2 and
Code Llama, mirroring Meta's llama/tokenizer.py) or a tiktoken BPE file (Llama 3.x, mirroring
llama_models/llama3/tokenizer.py). Both give plain int ids, BOS/EOS only when asked, and the ids
that end a turn (stop_ids); StreamDecoder turns ids into text as they arrive, for either kind.
"""

import base64
import binascii
import functools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import tiktoken
from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)

# Llama 3's special tokens, ids 128000 on, in Meta's order; the rest of the 256 are reserved.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL_TOKENS) + 2)]
# Meta's pre-tokenizer: contractions, words, numbers of up to 3 digits, punctuation, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Meta encodes at most this many characters per tiktoken call, and cuts runs of whitespace or of
# non-whitespace longer than MAX_RUN: both change the ids of very long texts, so both are kept.
MAX_CHUNK, MAX_RUN = 400_000, 25_000
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n?")


class Tokenizer:
    """A tokenizer.model of either kind: Tokenizer(path) is a SentencePieceTokenizer or a
    TiktokenTokenizer, by what the file holds (or `contents`, the file's bytes: path then only names it)."""

    path: Path
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # a generated one ends the row

    def __new__(cls, model_path: str | os.PathLike | None = None, contents: bytes | None = None):
        if cls is Tokenizer:  # (a subclass's, as copy and pickle make one, needs no path)
            cls = Tokenizer.kind(model_path, contents)
        return super().__new__(cls)

    @staticmethod
    def kind(model_path: str | os.PathLike, contents: bytes | None = None) -> type["Tokenizer"]:
        """The class for a tokenizer.model, from its first line alone (a tiktoken file's is a token and its rank)."""
        tiktoken_file = _TIKTOKEN_LINE.fullmatch(_first_line(Path(model_path), contents))
        return TiktokenTokenizer if tiktoken_file else SentencePieceTokenizer

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}: {s!r}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"the text holds {s[e.start]!r} at index {e.start}, half of a UTF-16 surrogate pair and no character: "
                "decode its source as UTF-8 (or pass errors='replace')"
            ) from None
        t = self._encode(s)
        return [self.bos_id] * bos + t + [self.eos_id] * eos

    def _encode(self, s: str) -> list[int]:
        raise NotImplementedError

    def decode(self, t: list[int]) -> str:
        raise NotImplementedError


def _first_line(path: Path, contents: bytes | None) -> bytes:
    if contents is not None:
        return contents[:4096].split(b"\n", 1)[0]
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer model at {path}: pass tokenizer_path= the tokenizer.model file")
    with open(path, "rb") as f:
        return f.readline(4096)


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 and Code Llama: Meta's SentencePiece BPE (byte fallback); Code Llama's 7B/13B
    models add the infilling pieces (prefix_id, suffix_id, middle_id, eot_id, else None)."""

    def __init__(self, model_path: str | os.PathLike, contents: bytes | None = None):
        self.path = Path(model_path)
        self.sp_model = SentencePieceProcessor()
        try:
            if contents is None:
                self.sp_model.Load(str(self.path))
            else:
                self.sp_model.LoadFromSerializedProto(contents)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"{self.path} is neither a SentencePiece model ({e}) nor a tiktoken BPE file (lines of base64 "
                "token, space, rank): pass the tokenizer.model that came with the model"
            ) from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.stop_ids = (self.eos_id,)
        # Code Llama's infilling pieces (piece_to_id gives the unknown id, 0, for a missing piece)
        self.prefix_id, self.suffix_id, self.middle_id, self.eot_id = (
            self.sp_model.piece_to_id(p) or None for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
        )
        logger.info(
            "tokenizer %s: %d words, BOS %d, EOS %d, PAD %d",
            self.path,
            self.n_words,
            self.bos_id,
            self.eos_id,
            self.pad_id,
        )

    def _encode(self, s: str) -> list[int]:
        return self.sp_model.encode(s)

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)

    @functools.cached_property
    def anchor_id(self) -> int | None:
        """A piece that decodes to itself, a visible character: decode([anchor, *ids]) after it is
        how ids read after earlier text (decoding ids alone drops their leading spaces: one
        dummy-prefix space, or all of them when the model was trained with remove_extra_whitespaces)."""
        sp = self.sp_model
        for i in range(self.n_words):
            piece = sp.id_to_piece(i)
            if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i) or sp.is_unused(i) or len(piece) != 1:
                continue
            if piece.isalnum() and sp.decode([i, i]) == piece * 2:
                return i
        return None

    def encode_infilling(self, s: str) -> list[int]:
        """s without SentencePiece's leading space (Code Llama's suffixes): Meta encodes "☺" + s and
        drops the first two pieces ("▁", "☺")."""
        return self.sp_model.encode("☺" + s)[2:]

    def decode_infilling(self, t: list[int]) -> str:
        """The text of ids that continue a prefix, without a leading space added."""
        return self.sp_model.decode([self.sp_model.piece_to_id("☺")] + t)[1:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3.x: byte-level BPE from a tiktoken file (128,000 ranks) plus Meta's 256 special tokens.
    Text that spells a special token is encoded as text, never as the special id."""

    def __init__(self, model_path: str | os.PathLike, contents: bytes | None = None):
        self.path = Path(model_path)
        self.ranks = _read_ranks(self.path, self.path.read_bytes() if contents is None else contents)
        self.special_tokens = {token: len(self.ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
        )
        self.n_words: int = len(self.ranks) + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)
        logger.info(
            "tokenizer %s: %d words (tiktoken), BOS %d, EOS %d", self.path, self.n_words, self.bos_id, self.eos_id
        )

    def _encode(self, s: str) -> list[int]:
        return [
            t for piece in _pieces(s) for t in self.model.encode(piece, allowed_special=set(), disallowed_special=())
        ]

    def decode(self, t: list[int]) -> str:
        return self.model.decode(t)


def _read_ranks(path: Path, contents: bytes) -> dict[bytes, int]:
    """A tiktoken file's ranks: one `base64(token) rank` per line."""
    ranks = {}
    for n, line in enumerate(contents.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}:{n} is not a tiktoken line (base64 token, space, rank): {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1} once each: the file is damaged")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE falls back on them: tiktoken panics at the first text that needs one
        raise ValueError(f"{path} lacks {len(missing)} of the 256 single-byte tokens: the file is damaged or cut")
    return ranks


def _pieces(s: str) -> Iterator[str]:
    """s in the pieces Meta encodes one at a time (MAX_CHUNK characters, runs cut at MAX_RUN)."""
    for i in range(0, len(s), MAX_CHUNK):
        yield from split_runs(s[i : i + MAX_CHUNK], MAX_RUN)


def split_runs(s: str, limit: int) -> Iterator[str]:
    """s cut so that no piece holds more than `limit` consecutive whitespace or non-whitespace
    characters (tiktoken's regex slows to a crawl on longer runs)."""
    start, run, space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            space, run = not space, 1
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class StreamDecoder:
    """Incremental decoding of one row: `push(id)` returns the text that id completes.

    One character may span several byte pieces (both kinds), so each step decodes a short window
    that starts one token back and takes the difference; a window ending in U+FFFD (an unfinished
    UTF-8 sequence) waits for more. SentencePiece drops a text's leading spaces, so a window that
    does not start the row is decoded after an anchor piece. The pieces returned always concatenate
    to decode(all ids pushed so far), minus any wait.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] was decoded last; ids[read:] is new

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back (a trailing U+FFFD that no later byte will complete)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        """ids as they read where they stand: after the row's earlier text unless they start it."""
        anchor = getattr(self.tokenizer, "anchor_id", None)  # SentencePiece's; tiktoken's decode concatenates
        if self.prefix == 0 or anchor is None:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode([anchor, *ids])[1:]
