"""Batch prompt completion from the command line (fire CLI), like Meta's example_text_completion.py
but on any device and any number of shards, with no torchrun.

    python inference.py                                   # the built-in model, example prompts
    python inference.py --ckpt_dir llama-2-7b --prompt "I believe" --prompt "Simply put,"
    python inference.py --ckpt_dir llama-2-7b --prompts_file prompts.jsonl --out completions.jsonl
"""

import json
import logging
import sys
from pathlib import Path

import fire
from tqdm import tqdm

from llama import LLaMa

EXAMPLE_PROMPTS = [
    "ROMEO:\n",
    "First Citizen:\nWe are",
    "To be, or not to be,",
    "KING RICHARD III:\nNow is the winter",
]


def read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSONL whose lines hold a "prompt" field (for prompts with newlines)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts_file {file} does not exist")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f'{file}:{n} is not a JSON object with a "prompt" field: {line[:80]!r}') from None
    return prompts


def complete(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    out: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 1,
    verbose: bool = False,
) -> None:
    """Complete prompts (repeat --prompt, or --prompts_file) with a Meta checkpoint folder
    (--ckpt_dir; the built-in model when omitted). Prints each completion, or writes JSONL to --out.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    prompts = prompts or EXAMPLE_PROMPTS
    llm = LLaMa.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                      device=device, dtype=dtype, seed=seed)  # fmt: skip
    batches = [prompts[i : i + max_batch_size] for i in range(0, len(prompts), max_batch_size)]
    sink = open(out, "w", encoding="utf-8") if out else None
    try:
        for batch in tqdm(batches, desc="batches", unit="batch", disable=None if len(batches) > 1 else True):
            tokens, texts = llm.text_completion(batch, temperature, top_p, max_gen_len)
            for p, t, text in zip(batch, tokens, texts):
                if sink:
                    sink.write(json.dumps({"prompt": p, "completion": text, "tokens": t}) + "\n")
                else:
                    tqdm.write(f"{p}\n> {text}\n\n==================================\n")
    finally:
        if sink:
            sink.close()


def split_prompts(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take every --prompt value out of argv verbatim: fire would turn "1,2" into a tuple and
    keep only the last of repeated flags."""
    prompts, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--prompt" and i + 1 < len(argv):
            prompts.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--prompt="):
            prompts.append(arg.removeprefix("--prompt="))
        else:
            rest.append(arg)
        i += 1
    return prompts, rest


def main(argv: list[str]) -> None:
    prompts, rest = split_prompts(argv)
    if prompts:  # handed to fire as a JSON list literal, which it parses back to a list of str
        rest.append("--prompt=" + json.dumps(prompts))
    try:
        fire.Fire(complete, command=rest)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
