"""Batch prompt completion from the command line (fire CLI), like Meta's example_text_completion.py
but on any device and any number of shards, with no torchrun. Commands: complete (the default),
chat and infill; `python inference.py chat --help` lists a command's flags.

    python inference.py                                   # the built-in model, example prompts
    python inference.py --ckpt_dir llama-2-7b --prompt "I believe" --prompt "Simply put,"
    python inference.py --ckpt_dir llama-2-7b --prompts_file prompts.jsonl --out completions.jsonl
    python inference.py chat --ckpt_dir llama-2-7b-chat --system "Answer briefly."
    python inference.py infill --ckpt_dir CodeLlama-7b --prefix "def fib(n):" --suffix "    return a"
"""

import difflib
import inspect
import json
import logging
import os
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import fire
from tqdm import tqdm

from llama import LLaMa
from llama.chat import UNSAFE_ERROR, encode_dialog, has_special_tags
from llama.model import is_int

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
    lines = [(n, line) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"--prompts_file {file} holds no prompts (only blank lines, or nothing)")
    if file.suffix.lower() != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f'{file}:{n} is not a JSON object with a "prompt" field: {line[:80]!r}') from None
        if not isinstance(prompt, str):
            raise ValueError(f'{file}:{n}: "prompt" is {json.dumps(prompt)[:40]}, not a string')
        prompts.append(prompt)
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
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    stream: bool | None = None,
    quantize: str | None = None,
    pack: bool = False,
    compile: bool = False,
    meta_schedule: bool = False,
    verbose: bool = False,
) -> None:
    """Complete prompts (repeat --prompt, or --prompts_file) with a Meta checkpoint folder
    (--ckpt_dir; the built-in model when omitted). Prints each completion, streaming it when
    stdout is a terminal (--stream to force either way), or writes JSONL to --out. A prompts
    file runs by continuous batching (a prompt takes a row's place as soon as it ends; greedy
    output is each prompt's run alone), with a progress bar on a terminal; --meta_schedule runs
    it in batches of --max_batch_size in file order, as Meta's code does (the same samples as
    --prompt). --compile (CUDA) runs the decode steps as CUDA graphs. --stop (repeatable) ends a
    row at a string taken as typed: "\\n" is a backslash and an n, bash's $'\\n' a newline.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    prompts = prompts or EXAMPLE_PROMPTS
    if out is not None:  # before the model loads, and on every rank alike
        if Path(out).is_dir():
            raise ValueError(f"--out {out} is a folder: name a file to write")
        if not Path(out).absolute().parent.is_dir():
            raise FileNotFoundError(f"--out {out}: the folder {Path(out).absolute().parent} does not exist")
    llm = LLaMa.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        quantize=quantize,
        pack=pack,
        compile=compile,
    )
    options = dict(
        temperature=temperature,
        top_p=top_p,
        max_gen_len=max_gen_len,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=stop,
    )
    if prompts_file and not meta_schedule and not stream:
        with open(out, "w", encoding="utf-8") if out and RANK == 0 else nullcontext() as sink:
            write_many(prompts, llm.complete_many(prompts, **options), sink, quiet=bool(out))
        return
    stream = sys.stdout.isatty() if stream is None else stream
    batches = [prompts[i : i + max_batch_size] for i in range(0, len(prompts), max_batch_size)]
    show = len(batches) > 1 and not stream
    with open(out, "w", encoding="utf-8") if out and RANK == 0 else nullcontext() as sink:
        for batch in tqdm(batches, desc="batches", unit="batch", disable=None if show and RANK == 0 else True):
            if stream and not out:
                print_streamed(batch, llm.stream(batch, **options))
                continue
            tokens, texts = llm.text_completion(batch, **options)
            for p, t, text in zip(batch, tokens, texts):
                write_one(p, text, t, sink, quiet=bool(out))


SEPARATOR = "\n\n==================================\n"


def write_one(prompt: str, text: str, tokens: list[int], sink, quiet: bool) -> None:
    """One completion as a JSONL line to sink, or printed unless quiet (under torchrun, ranks after
    0 have no sink and are quiet: they print nowhere)."""
    if sink:
        sink.write(json.dumps({"prompt": prompt, "completion": text, "tokens": tokens}) + "\n")
    elif not quiet:
        tqdm.write(f"{prompt}\n> {text}{SEPARATOR}")


def write_many(prompts: list[str], completions, sink, quiet: bool) -> None:
    """Each completion, in prompt order, as JSONL to sink or printed (unless quiet); on a terminal,
    a progress bar of prompts done and new tokens per second."""
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=None if RANK == 0 else True)
    start, new_tokens = time.perf_counter(), 0
    with bar:
        for p, done in zip(prompts, completions):
            write_one(p, done.text, done.tokens, sink, quiet)
            new_tokens += len(done.tokens)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} tokens/s", refresh=False)
            bar.update()


def print_streamed(prompts: list[str], events) -> None:
    """Print a batch's completions in prompt order while they stream: the current row live, later
    rows buffered until their turn (they are usually done by then)."""
    texts, done, current = [""] * len(prompts), [False] * len(prompts), 0
    print(f"{prompts[0]}\n> ", end="", flush=True)
    for event in events:
        texts[event.index] += event.text
        done[event.index] |= event.done
        if event.index == current:
            print(event.text, end="", flush=True)
        while current < len(prompts) and done[current]:
            print(SEPARATOR)
            current += 1
            if current < len(prompts):
                print(f"{prompts[current]}\n> {texts[current]}", end="", flush=True)


def chat(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    system: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 1,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    quantize: str | None = None,
    verbose: bool = False,
) -> None:
    """Chat in the terminal in the model's chat format (Llama 2's for a -chat model, Llama 3's for an
    Instruct one). The reply streams; /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C
    stops a reply."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not is_int(max_gen_len) or max_gen_len < 1:  # before the model loads
        raise ValueError(f"max_gen_len={max_gen_len!r}: ask for a whole number of new tokens, at least 1")
    llm = LLaMa.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        device=device,
        dtype=dtype,
        seed=seed,
        quantize=quantize,
    )
    start = [{"role": "system", "content": system}] if system else []
    if start and fit_dialog(llm, [*start, {"role": "user", "content": ""}], len(start), max_gen_len) is None:
        raise ValueError(f"--system leaves no room for a message in max_seq_len={max_seq_len}: shorten it")
    dialog = list(start)
    print("Chat: /reset clears the history, /exit quits, Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            line = read_line("you> ")
        except KeyboardInterrupt:
            print("\n(/exit quits)")
            continue
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            dialog = list(start)
            print("(history cleared)", flush=True)
            continue
        if not line.strip():
            continue
        dialog.append({"role": "user", "content": line})
        if has_special_tags(dialog, llm.tokenizer):
            print(f"llama> {UNSAFE_ERROR}", flush=True)
            dialog.pop()
            continue
        tokens = fit_dialog(llm, dialog, len(start), max_gen_len)
        if tokens is None:
            print(f"(that message does not fit max_seq_len={max_seq_len}: shorten it)", flush=True)
            dialog.pop()
            continue
        print("llama> ", end="", flush=True)
        reply, reason = "", "end_of_turn"
        try:
            for event in llm.stream(
                [tokens],
                temperature,
                top_p,
                min(max_gen_len, max_seq_len - len(tokens)),
                top_k=top_k,
                repetition_penalty=repetition_penalty,
            ):
                print(event.text, end="", flush=True)
                reply, reason = reply + event.text, event.stop_reason or reason
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)
        # Llama 3 writes an answer that ended with <|eom_id|> back the same way
        dialog.append({"role": "assistant", "content": reply, "stop_reason": reason})


def infill(
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    prefix: list[str] | None = None,
    suffix: list[str] | None = None,
    suffix_first: bool = False,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 1,
    quantize: str | None = None,
    verbose: bool = False,
) -> None:
    """Fill the gap between each --prefix and --suffix (repeat both, in pairs) with Code Llama 7B
    or 13B, as Meta's example_infilling.py does (greedy unless --temperature); prints the whole text
    with the generated middle."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    prefixes, suffixes = list(prefix or []), list(suffix or [])
    if not prefixes or len(prefixes) != len(suffixes):
        raise ValueError(f"{len(prefixes)} --prefix and {len(suffixes)} --suffix: give them in pairs, at least one")
    llm = LLaMa.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=len(prefixes),
        device=device,
        dtype=dtype,
        seed=seed,
        quantize=quantize,
    )
    for item in llm.text_infilling(prefixes, suffixes, temperature, top_p, max_gen_len, suffix_first=suffix_first):
        print(f"{item['full_text']}{SEPARATOR}")


def fit_dialog(llm: LLaMa, dialog: list[dict], keep: int, max_gen_len: int) -> list[int] | None:
    """The dialog's prompt ids, dropping the oldest user/assistant turns (never the system
    message) until it leaves room to reply; None if the last message alone leaves none."""
    limit = llm.model.max_seq_len
    if len(encode_dialog(llm.tokenizer, dialog[:keep] + dialog[-1:])) >= limit:
        return None  # refused before any turn of the history is dropped
    tokens = encode_dialog(llm.tokenizer, dialog)
    while len(tokens) + min(max_gen_len, limit // 2) > limit and len(dialog) > keep + 1:
        del dialog[keep : keep + 2]
        print(f"(dropped the oldest turn to fit max_seq_len={limit})", flush=True)
        tokens = encode_dialog(llm.tokenizer, dialog)
    return tokens if len(tokens) < limit else None


# Flags whose values must reach us verbatim: fire would turn "1,2" into a tuple and "42" into an
# int (a folder or file named 2024 too), and keep only the last of a repeated flag.
LIST_FLAGS = ("prompt", "stop", "prefix", "suffix")
STRING_FLAGS = ("system", "ckpt_dir", "tokenizer_path", "prompts_file", "out")


def take_raw_flags(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split argv into what fire may parse and the verbatim values of LIST_FLAGS + STRING_FLAGS."""
    raw: dict[str, list[str]] = {}
    rest, i = [], 0
    names = LIST_FLAGS + STRING_FLAGS
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None  # fire's --ckpt-dir too
        if name in names and "=" in arg:
            raw.setdefault(name, []).append(arg.split("=", 1)[1])
        elif name in names and i + 1 < len(argv):
            raw.setdefault(name, []).append(argv[i + 1])
            i += 1
        elif name in names:
            raise ValueError(f"--{name} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, raw


RANK = 0  # this process's, under torchrun (init_distributed)


def init_distributed(device: str | None) -> None:
    """Under torchrun (WORLD_SIZE > 1): join its process group, NCCL on GPUs and gloo on CPUs (no
    GPU, or --device cpu), so that LLaMa.build splits the model over the processes; only rank 0
    prints and writes."""
    global RANK
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from llama.parallel import join

    RANK = join(device)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        logging.disable(logging.WARNING)  # rank 0 says it once; errors still show


def close_distributed(code: int = 0) -> None:
    """Under torchrun: end this rank with code (llama.parallel.leave)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from llama.parallel import leave

        leave(code)


def read_line(prompt: str) -> str | None:
    """A line of input, None at its end; under torchrun rank 0 reads it and every rank gets it."""
    line = None
    if RANK == 0:
        with suppress(EOFError):
            line = input(prompt)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def flag_value(args: list[str], name: str) -> str | None:
    """The last value given to --name (as --name=value or --name value), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def unknown_flag(command, args: list[str]) -> str | None:
    """What is wrong with the first flag the command does not take: a --flag it lacks, said with the
    nearest one it has (fire would run the command without it), or a short -x (fire's, which parse
    their values: -p "the king" became eight prefixes)."""
    names = set(inspect.signature(command).parameters)
    usage = "python inference.py" + ("" if command is complete else f" {command.__name__}") + " --help"
    for arg in args:
        if len(arg) == 2 and arg[0] == "-" and arg[1].isalpha() and arg != "-h":
            long = " or ".join(sorted(f"--{name}" for name in names if name.startswith(arg[1])))
            return f"{arg}: write flags in full ({long or usage + ' lists them'})"
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") and arg != "--help" else None
        if name and name not in names and name.removeprefix("no") not in names:  # fire's --noflag is False
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            return f"no flag --{name}{hint} here: {usage} lists them"
    return None


def main(argv: list[str]) -> None:
    commands = {"chat": chat, "infill": infill}
    command, argv = (commands[argv[0]], argv[1:]) if argv[:1] and argv[0] in commands else (complete, argv)
    try:
        rest, raw = take_raw_flags(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if "--help" in rest or "-h" in rest:
        print(f"{__doc__.strip()}\n\n{command.__name__}'s flags:\n", flush=True)
    elif (wrong := unknown_flag(command, rest + [f"--{name}" for name in raw])) is not None:
        sys.exit(f"error: {wrong}")
    for name, values in raw.items():  # handed to fire as JSON literals, which it parses back
        rest.append(f"--{name}=" + json.dumps(values if name in LIST_FLAGS else values[-1]))
    init_distributed(flag_value(rest, "device"))
    try:
        fire.Fire(command, command=rest)
    except (ValueError, OSError) as e:  # bad input, an unwritable file: the message (once), not a traceback
        if RANK == 0:
            print(f"error: {e}", file=sys.stderr)
        close_distributed(1)
        sys.exit(1)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
