"""The SentencePiece tokenizer of LLaMA 1/2 and Code Llama, mirroring Meta's llama/tokenizer.py.

Ids are plain Python ints; BOS/EOS are added by `encode` only when asked, as in Meta's code.
"""

import logging
import os
from pathlib import Path

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike, model_proto: bytes | None = None):
        """From a tokenizer.model file, or from its bytes (model_path then only names it)."""
        path = Path(model_path)
        if model_proto is None and not path.is_file():
            raise FileNotFoundError(f"no tokenizer model at {path}: pass tokenizer_path= the tokenizer.model file")
        self.path = path
        self.sp_model = SentencePieceProcessor()
        try:
            if model_proto is None:
                self.sp_model.Load(str(path))
            else:
                self.sp_model.LoadFromSerializedProto(model_proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"{path} is not a SentencePiece model ({e}). Llama 1/2 and Code Llama tokenizers are; "
                "Llama 3's tokenizer.model is a tiktoken file, which this project does not read"
            ) from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        logger.info(
            "tokenizer %s: %d words, BOS %d, EOS %d, PAD %d", path, self.n_words, self.bos_id, self.eos_id, self.pad_id
        )
        assert self.sp_model.vocab_size() == self.sp_model.GetPieceSize()

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}: {s!r}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)


class StreamDecoder:
    """Incremental decoding of one row: `push(id)` returns the text that id completes.

    Decoding a lone piece drops SentencePiece's leading-space marker and a lone byte piece is
    not a character, so each step decodes a short window that starts one token back and takes
    the difference; a window ending in U+FFFD (an unfinished UTF-8 sequence) waits for more.
    The pieces returned always concatenate to decode(all ids pushed so far), minus any wait.
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
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]
