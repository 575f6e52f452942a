"""Code Llama's infilling prompt (Meta's codellama llama/generation.py): the code before and after a
gap around the ▁<PRE>, ▁<SUF> and ▁<MID> pieces, prefix first or suffix first (SPM); the model
writes the middle and ends it with ▁<EOT>. Code Llama 7B and 13B have those pieces.
"""

from llama.tokenizer import SentencePieceTokenizer, Tokenizer


def check_infilling(tokenizer: Tokenizer | None) -> SentencePieceTokenizer:
    """The tokenizer, if it has Code Llama's infilling pieces."""
    pieces = [getattr(tokenizer, f"{name}_id", None) for name in ("prefix", "suffix", "middle", "eot")]
    if not isinstance(tokenizer, SentencePieceTokenizer) or None in pieces:
        path = getattr(tokenizer, "path", None)
        raise ValueError(
            f"the tokenizer {path} has no infilling pieces (▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>): infilling needs "
            "Code Llama 7B or 13B and its tokenizer.model"
        )
    return tokenizer


def infilling_prompt(
    tokenizer: SentencePieceTokenizer, prefix: str, suffix: str, suffix_first: bool = False
) -> list[int]:
    """<PRE> {prefix} <SUF>{suffix} <MID>, or with suffix_first <PRE> <SUF>{suffix} <MID> {prefix};
    the suffix without SentencePiece's leading space, as Meta encodes it."""
    pre, suf, mid = tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id
    prefix_ids = tokenizer.encode(prefix, bos=False, eos=False)
    suffix_ids = tokenizer.encode_infilling(suffix)
    if suffix_first:
        return [tokenizer.bos_id, pre, suf, *suffix_ids, mid, *prefix_ids]
    return [tokenizer.bos_id, pre, *prefix_ids, suf, *suffix_ids, mid]
