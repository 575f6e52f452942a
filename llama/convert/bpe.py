"""Llama 3's tiktoken vocabulary in the forms other tools keep it: Hugging Face's tokenizer.json and
GGUF's "gpt2" vocabulary both spell each byte-level token in GPT-2's printable byte alphabet and
list merges instead of ranks. Ranks -> merges: every split (left, right) of a token whose halves
are tokens too, in the order of the whole token's rank (a pair merges when its concatenation is a
token, lowest rank first: tiktoken's rule). Spelled tokens -> ranks: their order.
"""

import base64

from llama.tokenizer import LLAMA3_SPECIAL_TOKENS, TiktokenTokenizer

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
