"""A Meta folder to a quantized folder (llama.quantize's format: int8 or int4 weights, loaded by
LLaMa.build without quantizing again), on the CPU. One shard already in the dtype (Meta's 7B in
bf16) is quantized a matrix at a time as it is mapped; other folders are merged in the dtype first.

    python -m llama.convert.quantized llama-2-7b llama-2-7b-int4 --scheme int4
"""

import os
from pathlib import Path

import torch

from llama.checkpoint import check_out_dir
from llama.convert import run_cli
from llama.loading import load_meta_folder
from llama.quantize import save_quantized
from llama.runtime import resolve_dtype


def meta_folder_to_quantized(
    src: str | os.PathLike, out: str | os.PathLike, scheme: str = "int8", dtype: str = "bfloat16"
) -> Path:
    """Quantize a Meta folder once and save it (with its tokenizer.model) into out."""
    check_out_dir(out)  # before the model loads
    cpu = torch.device("cpu")
    model, tokenizer = load_meta_folder(src, device=cpu, dtype=resolve_dtype(dtype, cpu), quantize=scheme)
    return save_quantized(model, out, tokenizer.path)


def main(src: str, out: str, scheme: str = "int8", dtype: str = "bfloat16") -> None:
    print(f"wrote {meta_folder_to_quantized(src, out, scheme, dtype)}")


if __name__ == "__main__":
    run_cli(main)
