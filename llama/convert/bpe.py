"""Llama 3's tiktoken vocabulary in the forms other tools keep it: Hugging Face's tokenizer.json and
GGUF's "gpt2" vocabulary both spell each byte-level token in GPT-2's printable byte alphabet and
list merges instead of ranks. Ranks -> merges: every split (left, right) of a token whose halves
are tokens too, in the order of the whole token's rank (a pair merges when its concatenation is a
token, lowest rank first: tiktoken's rule). Spelled tokens -> ranks: their order.
"""

import base64
import json
import os
from pathlib import Path

from llama.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, TiktokenTokenizer

# GPT-2's alphabet: bytes that print stand for themselves; the others take chr(256), chr(257)...
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
BYTE_TO_CHAR = {b: chr(b) for b in _PRINTABLE} | {
    b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def spell(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def unspell(text: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(
            f"token {text!r} is not spelled in the byte-level alphabet ({e.args[0]!r} is not in it)"
        ) from None


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Each (left, right) whose join is a token, by the join's rank (then the halves')."""
    found = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def vocabulary(tokenizer: TiktokenTokenizer) -> list[str]:
    """Every id's token: the ranks spelled, then Meta's special tokens by name."""
    spelled = [""] * len(tokenizer.ranks)
    for token, rank in tokenizer.ranks.items():
        spelled[rank] = spell(token)
    return spelled + list(tokenizer.special_tokens)


def tiktoken_file(spelled: list[str]) -> bytes:
    """A tokenizer.model (base64 token, space, rank per line) for tokens spelled in id order."""
    return b"".join(base64.b64encode(unspell(t)) + f" {rank}\n".encode() for rank, t in enumerate(spelled))


def check_specials(names: list[str], where: str) -> None:
    """Refuse a vocabulary whose special tokens are not Llama 3's 256 (other names would give other ids)."""
    if len(names) != len(LLAMA3_SPECIAL_TOKENS) or names[:2] != LLAMA3_SPECIAL_TOKENS[:2]:
        raise ValueError(
            f"{where}: {len(names)} special tokens starting {names[:2]}; a Llama 3 vocabulary has "
            f"{len(LLAMA3_SPECIAL_TOKENS)} starting {LLAMA3_SPECIAL_TOKENS[:2]}"
        )


def write_tokenizer_json(tokenizer: TiktokenTokenizer, out: Path) -> None:
    """tokenizer.json (with the tokenizers package) and tokenizer_config.json that make transformers'
    PreTrainedTokenizerFast encode as tokenizer does (but for text that spells a special token,
    which transformers reads as the special id)."""
    hf = _hf_tokenizers()
    model = hf.models.BPE(
        {spell(t): rank for t, rank in tokenizer.ranks.items()},
        [(spell(a), spell(b)) for a, b in merges(tokenizer.ranks)],
        ignore_merges=True,  # a whole piece in the vocabulary is one token, as in tiktoken
    )
    fast = hf.Tokenizer(model)
    split = hf.pre_tokenizers.Split(hf.Regex(LLAMA3_PATTERN), behavior="isolated")
    fast.pre_tokenizer = hf.pre_tokenizers.Sequence(
        [split, hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    fast.decoder = hf.decoders.ByteLevel()
    fast.add_special_tokens([hf.AddedToken(name, special=True, normalized=False) for name in tokenizer.special_tokens])
    bos, eos = LLAMA3_SPECIAL_TOKENS[:2]
    fast.post_processor = hf.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    fast.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"clean_up_tokenization_spaces": False}, indent=2))


def tiktoken_from_tokenizer_json(data: dict, where: str | os.PathLike) -> bytes | None:
    """Llama 3's tokenizer.model for a tokenizer.json's byte-level BPE (its ids are the ranks), None
    for another kind of tokenizer; a byte-level one without Llama 3's special tokens is refused."""
    model = data.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) + json.dumps(data.get("decoder"))
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not byte_level:
        return None
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    base = sorted((i, t) for t, i in model["vocab"].items() if i not in added)
    if [i for i, _ in base] != list(range(len(base))):
        raise ValueError(f"{where}: its BPE ids are not 0..{len(base) - 1}")
    check_specials([added[i] for i in sorted(added) if i >= len(base)], str(where))
    return tiktoken_file([t for _, t in base])


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "Llama 3's tokenizer is written for Hugging Face with the tokenizers package: pip install tokenizers "
            "(or pip install 'llama-reference[convert]')"
        ) from None
    return tokenizers
