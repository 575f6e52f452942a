"""Tensor parallelism across the processes of a torch.distributed group (torchrun), applied to a built
architecture from outside the model, with PyTorch's tensor-parallel API: in each block wq wk wv w1
w3 split by output rows (ColwiseParallel), wo w2 by input columns (RowwiseParallel: one all-reduce
after the attention and one after the feed-forward), the embedding split on the vocabulary, the
output's logits gathered, norms replicated. Each rank holds its heads and the KV cache of its kv
heads; with more ranks than kv heads, kv heads are repeated, as Meta's code does. Each rank reads
only its own slices of the mapped shards, whatever their number. Meta's names and state_dict() keys
stay (as DTensors).
"""

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from llama.checkpoint import MetaCheckpoint, split_dim
from llama.loading import kv_cache_bytes, open_meta_folder
from llama.model import ModelArgs, Transformer
from llama.runtime import check_fits
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # split by output rows, as Meta's ColumnParallelLinear
ROW = ("wo", "w2")  # split by input columns, as Meta's RowParallelLinear


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This process's device under torchrun: its GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus, here = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if here > gpus:  # every rank on this machine says so, rank 0 included
        raise ValueError(
            f"torchrun started {here} processes on this machine but it has {gpus} CUDA device(s): start at most "
            f"{gpus} (--nproc_per_node), or pass device='cpu' (--device cpu) to run the processes on the CPU"
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % gpus)))
    torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    return device


def join(device: str | torch.device | None = None) -> int:
    """Join torchrun's process group (its environment names the rendezvous) and return this rank:
    NCCL on GPUs, gloo on CPUs (no GPU, or device 'cpu')."""
    if not dist.is_initialized():
        on_cpu = not torch.cuda.is_available() or str(device).startswith("cpu")
        dist.init_process_group("gloo" if on_cpu else "nccl")
    return dist.get_rank()


def leave(code: int = 0) -> NoReturn:
    """End this rank: leave the default process group, after every rank has reached this point
    unless code says this one failed (a rank may fail alone), and exit at once with code. A rank
    that exits the usual way can abort in gloo's teardown at interpreter exit ("terminate called
    without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def world_sizes(args: ModelArgs) -> list[int]:
    """The process counts that can split this architecture: each divides the query heads, the
    feed-forward width and the vocabulary, and divides the kv heads or is a multiple of them."""
    kv = args.kv_heads
    return [
        n
        for n in range(1, args.n_heads + 1)
        if args.n_heads % n == 0
        and args.ffn_hidden_dim % n == 0
        and args.vocab_size % n == 0
        and (kv % n == 0 or n % kv == 0)
    ]


def check_world_size(args: ModelArgs, n: int, folder: Path) -> None:
    if n not in world_sizes(args):
        raise ValueError(
            f"{n} processes cannot split {folder} (n_heads={args.n_heads}, n_kv_heads={args.kv_heads}, "
            f"feed-forward width {args.ffn_hidden_dim}, vocab {args.vocab_size}): use one of "
            f"{', '.join(map(str, world_sizes(args)))} (torchrun --nproc_per_node)"
        )


def together(fn: Callable, *args, **kwargs):
    """fn(*args) on every rank; an error on any rank is raised on all of them (a rank alone would
    leave the others waiting in a collective), the failing rank's message first."""
    error = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # re-raised below, on this rank and every other
        error, result = e, None
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"rank {rank} failed: {message}")
    return result


def load_parallel(
    folder: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_batch_size: int,
    max_seq_len: int,
) -> tuple[Transformer, Tokenizer]:
    """This rank's part of a Meta folder: the model split over the default process group, each weight's
    slice read from the mapped shards, nothing else resident. What can fail on one rank alone (files,
    memory) is agreed on before and after the collectives, so every rank raises the same error."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, n = world()
    checkpoint, tokenizer, repeat = together(_open, folder, tokenizer_path, n)
    args = checkpoint.args
    mesh = init_device_mesh(device.type, (n,))
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, n_kv_heads=args.kv_heads * repeat)).to(dtype)
    model.params = args  # the checkpoint's architecture, as params.json says it
    parallelize(model, mesh)
    together(
        _fill,
        checkpoint,
        model,
        device,
        rank,
        repeat,
        kv_cache_bytes(args, dtype, max_batch_size, max_seq_len, args.kv_heads * repeat // n),
        f"max_batch_size={max_batch_size} x max_seq_len={max_seq_len}",
    )
    logger.info("rank %d of %d holds %.1f MB of weights", rank, n, local_bytes(model) / 1e6)
    return model, tokenizer


def _open(folder: str | os.PathLike, tokenizer_path: str | os.PathLike | None, n: int):
    """The checkpoint (mapped), its tokenizer and the copies of each kv head that n ranks need."""
    checkpoint, tokenizer = open_meta_folder(folder, tokenizer_path)
    check_world_size(checkpoint.args, n, checkpoint.dir)
    return checkpoint, tokenizer, max(1, n // checkpoint.args.kv_heads)


def _fill(
    checkpoint: MetaCheckpoint, model: Transformer, device, rank: int, repeat: int, cache_bytes: int, cache_args: str
) -> None:
    """Allocate this rank's slices, if they fit beside its KV cache, and read them from the shards."""
    check_fits(local_bytes(model), cache_bytes, device, cache_args)
    model.to_empty(device=device)
    with torch.no_grad():
        for key, target in model.state_dict().items():
            _read_slice(checkpoint, key, target, rank, repeat if key.split(".")[-2] in ("wk", "wv") else 1)
    checkpoint.shards = []  # the mappings: each rank touched only its slices' pages


def parallelize(model: Transformer, mesh) -> Transformer:
    """Split a (meta-device) Transformer over mesh, in place: its parameters become DTensors of this
    rank's slices, and each attention counts only its own heads."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n = mesh.size()
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    for i, layer in enumerate(model.layers):
        plan |= {f"layers.{i}.attention.{name}": ColwiseParallel() for name in COLUMN[:3]}
        plan |= {f"layers.{i}.feed_forward.{name}": ColwiseParallel() for name in COLUMN[3:]}
        plan |= {f"layers.{i}.attention.wo": RowwiseParallel(), f"layers.{i}.feed_forward.w2": RowwiseParallel()}
        layer.attention.n_heads //= n
        layer.attention.n_kv_heads //= n
    parallelize_module(model, mesh, plan)
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's weights (a DTensor's own slice, not the global tensor)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(getattr(t, "to_local", lambda t=t: t)().numel() * t.element_size() for t in tensors)


def _read_slice(checkpoint: MetaCheckpoint, key: str, target: torch.Tensor, rank: int, repeat: int) -> None:
    """Copy this rank's part of weight `key` (a DTensor slice, or all of a replicated tensor) from the
    checkpoint's shards, each of which holds an equal run of it along its split dim."""
    local = target.to_local() if hasattr(target, "to_local") else target
    dim = target.placements[0].dim if hasattr(target, "placements") and target.placements[0].is_shard() else None
    start = rank * local.shape[dim] if dim is not None else 0
    if repeat > 1:  # this rank's kv head is copy rank % repeat of checkpoint head rank // repeat
        start = rank // repeat * local.shape[dim]
    shards = checkpoint.shards
    for i, shard in enumerate(shards):
        piece = shard[key]
        split = split_dim(key, piece.shape, checkpoint.args) if len(shards) > 1 else None
        # this shard's region of the global tensor, against the region the rank wants
        offset = i * piece.shape[split] if split is not None else 0
        if split is not None and split == dim:
            lo, hi = max(start, offset), min(start + local.shape[dim], offset + piece.shape[split])
            if lo < hi:
                local.narrow(dim, lo - start, hi - lo).copy_(piece.narrow(split, lo - offset, hi - lo))
            continue
        rows = piece if dim is None else piece.narrow(dim, start, local.shape[dim])
        if split is None:
            local.copy_(rows)
            break  # replicated in the checkpoint: the first shard holds it all
        local.narrow(split, offset, piece.shape[split]).copy_(rows)
