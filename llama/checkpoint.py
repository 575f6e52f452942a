"""Meta's checkpoint folder: params.json plus consolidated.NN.pth model-parallel shards.

Reads any number of shards onto one device (merging them by Meta's parallel layout) and
writes them back the way Meta splits them. Tensors never pass through pickle code execution:
every load is `weights_only=True`.
"""

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from llama.model import ModelArgs, Transformer, is_int
from llama.runtime import file_mappings, release_mapped, resolve_dtype

logger = logging.getLogger(__name__)

# Meta's fairscale layers: ColumnParallelLinear splits the output rows (dim 0), RowParallelLinear
# the input columns (dim 1). 1-D norms are replicated on every shard.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")
DROPPED_KEYS = ("rope.freqs",)  # Llama 1/2 store their rotation table; we compute it


def read_params(ckpt_dir: str | os.PathLike) -> ModelArgs:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no params.json in {Path(ckpt_dir)}: a Meta checkpoint folder has one beside its shards"
        )
    return read_params_file(path)


def read_params_file(path: Path) -> ModelArgs:
    """A params.json's ModelArgs; whatever is wrong names the file and the field."""
    try:
        args = ModelArgs.from_params(json.loads(path.read_bytes().decode("utf-8")))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if args.extra:
        logger.info("%s: keeping keys this version does not use: %s", path, sorted(args.extra))
    return args


def find_tokenizer(ckpt_dir: Path) -> Path | None:
    """Meta's downloads put tokenizer.model in the model folder or in its parent."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def split_dim(key: str, shape: torch.Size, args: ModelArgs) -> int | None:
    """The dim along which Meta's model parallelism splits `key`, or None if it is replicated."""
    if len(shape) == 1 or key in DROPPED_KEYS:
        return None
    if key == "tok_embeddings.weight":
        # Llama 1/2 and Code Llama split the embedding dim (ParallelEmbedding); Llama 3 the
        # vocabulary (VocabParallelEmbedding). A shard holding all of `dim` tells which.
        return 0 if shape[1] == args.dim else 1
    name = key.split(".")[-2]
    if name in COLUMN_PARALLEL:
        return 0
    if name in ROW_PARALLEL:
        return 1
    raise ValueError(f"unexpected 2-D weight {key!r} {tuple(shape)}: not part of Meta's LLaMA layout")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A .pth file's tensors, mapped (mmap) where the format allows. A file that is not a plain state
    dict of tensors is an error naming it; one whose loading would run code is refused, never run."""
    if not path.is_file():  # a directory, or a FIFO, whose reading would block forever
        raise ValueError(f"{path} is not a regular file: a shard is a file written by torch.save")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: the download or copy did not finish; fetch it again")
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not an object it names, but bytes that are no pickle
            raise ValueError(f"{path} is not a PyTorch checkpoint, or a damaged one: fetch it again") from None
        raise ValueError(
            f"refused to load {path}: it holds objects other than tensors, and loading it could run "
            f"code ({str(e).splitlines()[0]}). Only load checkpoints from a source you trust, "
            "saved as plain state dicts."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({str(e).split('. ')[0]}): it is truncated or "
            "damaged; fetch it again (checklist.chk has its md5)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (weight names -> tensors)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor: not a plain state dict")
    return state


class MetaCheckpoint:
    """A checkpoint folder opened lazily (mmap): its params and the merged shape of each weight."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.dir} does not exist")
        self.args = read_params(self.dir)
        self.paths = sorted(self.dir.glob("consolidated.*.pth"))
        if not self.paths:
            raise FileNotFoundError(f"no consolidated.*.pth shards in {self.dir}")
        n = len(self.paths)
        for what, count in (("n_heads", self.args.n_heads), ("n_kv_heads", self.args.kv_heads)):
            if count % n:
                raise ValueError(f"{n} shards in {self.dir} cannot split {what}={count}: is a shard missing or extra?")
        self.shards = [load_shard(p) for p in self.paths]
        for path, shard in zip(self.paths, self.shards):
            for key in DROPPED_KEYS:
                shard.pop(key, None)
            for key, tensor in shard.items():
                if not tensor.is_floating_point():  # cast to float, it would run and give nonsense
                    raise ValueError(f"{path}: {key} is {tensor.dtype}; a LLaMA's weights are floating point")
        self.shapes = self._merged_shapes()

    def _merged_shapes(self) -> dict[str, torch.Size]:
        first = self.shards[0]
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            if shard.keys() != first.keys():
                diff = sorted(shard.keys() ^ first.keys())
                raise ValueError(f"{path} and {self.paths[0]} hold different keys: {diff[:5]}")
        shapes = {}
        for key, tensor in first.items():
            pieces = [s[key].shape for s in self.shards]
            dim = split_dim(key, tensor.shape, self.args)
            kept = [tuple(p[:dim]) + tuple(p[dim + 1 :]) if dim is not None else tuple(p) for p in pieces]
            if len(set(kept)) != 1 or (dim is not None and len({p[dim] for p in pieces}) != 1):
                raise ValueError(f"shards disagree on the shape of {key}: {[tuple(p) for p in pieces]}")
            merged = list(tensor.shape)
            if dim is not None:
                merged[dim] *= len(self.shards)
            shapes[key] = torch.Size(merged)
        return shapes

    def maps_in_place(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether load_into will use the shard's own mmap'd tensors as the weights: one shard,
        already in dtype, loaded onto the CPU. Only then is nothing but the mapping resident."""
        return len(self.shards) == 1 and device.type == "cpu" and all(t.dtype == dtype for t in self.shards[0].values())

    @property
    def vocab_size(self) -> int:
        return self.shapes["tok_embeddings.weight"][0]

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(s.numel() for s in self.shapes.values()) * dtype.itemsize

    def load_into(self, model: Transformer) -> None:
        """Fill `model` (allocated, e.g. by to_empty) strictly, shard by shard, then close the shards.

        Each tensor's pages are given back once copied, so peak memory is about the model's size. A
        single shard already in the model's dtype on the CPU is used in place (mmap, no copy at all).
        """
        expected = model.state_dict()
        missing, unexpected = sorted(expected.keys() - self.shapes.keys()), sorted(self.shapes.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{self.dir} does not match params.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, shape in self.shapes.items():
            if expected[key].shape != shape:
                raise ValueError(
                    f"{key}: the checkpoint's shape is {tuple(shape)} but params.json in {self.dir} "
                    f"gives {tuple(expected[key].shape)}"
                )
        shards, self.shards = self.shards, []
        in_place, spans = {}, file_mappings()
        with torch.no_grad():
            for i in tqdm(range(len(shards)), desc="loading shards", unit="shard", disable=None):
                shard, shards[i] = shards[i], None
                for key, tensor in shard.items():
                    target = expected[key]
                    dim = split_dim(key, tensor.shape, self.args)
                    source = tensor
                    if target.device.type == "cuda" and tensor.dtype != target.dtype:
                        # converted on the device: copy_ would convert on the CPU first, a pass over every weight
                        source = tensor.to(target.device)
                    if len(shards) == 1 and tensor.dtype == target.dtype and target.device.type == "cpu":
                        in_place[key] = tensor
                    elif dim is not None:
                        size = tensor.shape[dim]
                        target.narrow(dim, i * size, size).copy_(source)
                    elif i == 0:
                        target.copy_(source)
                    elif not torch.equal(target, source.to(target)):
                        raise ValueError(f"{self.paths[i]} disagrees with {self.paths[0]} on replicated {key}")
                    if key not in in_place:
                        release_mapped([tensor], spans)  # copied: its file pages need not stay resident
                del shard
        if in_place:  # the rest (another dtype: fp32 norms beside bf16 matrices) was copied into place
            model.load_state_dict(expected | in_place, strict=True, assign=True)


def load_merged(meta_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """A Meta folder's weights merged from any number of shards, in the checkpoint's dtype."""
    checkpoint = MetaCheckpoint(meta_dir)
    args = checkpoint.args
    args.vocab_size = checkpoint.vocab_size  # params.json may say -1 (take the tokenizer's)
    with torch.device("meta"):
        model = Transformer(args).to(checkpoint.shards[0]["tok_embeddings.weight"].dtype)
    model.to_empty(device="cpu")
    checkpoint.load_into(model)
    return model.state_dict(), args


def cast(state_dict: dict[str, torch.Tensor], dtype: str | torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict in dtype (a name or torch.dtype); None leaves it as it is."""
    if dtype is None:
        return state_dict
    dtype = resolve_dtype(dtype, torch.device("cpu"))
    return {k: v.to(dtype) for k, v in state_dict.items()}


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse, as a place to write a model, a file, or a folder that already holds one (Meta's
    params.json or shards, Hugging Face's config.json or safetensors, a GGUF file): writing over it
    would destroy it, and over the folder a model was just mapped from, the very weights being written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: name a folder to write the model into")
    files = [out / "params.json", out / "config.json"]
    files += [*out.glob("consolidated.*.pth"), *out.glob("*.safetensors"), *out.glob("*.gguf")]
    held = sorted(p.name for p in files if p.exists())
    if held:
        raise ValueError(f"{out} already holds a model ({', '.join(held[:3])}): write to a new or empty folder")
    return out


def new_checkpoint_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """out_dir, made where missing, and checked (check_out_dir); with overwrite, its old shards and
    quantization.json removed instead (fewer new shards would leave stale ones beside them)."""
    out = Path(out_dir) if overwrite else check_out_dir(out_dir)
    for old in [*out.glob("consolidated.*.pth"), *out.glob("quantization.json")]:
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_tokenizer(source: str | os.PathLike, out: Path) -> None:
    """source as out/tokenizer.model, unless it is that very file (a folder written beside it)."""
    target = out / "tokenizer.model"
    if not (target.exists() and os.path.samefile(source, target)):
        shutil.copyfile(source, target)


def save_checkpoint(
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str | os.PathLike,
    n_shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a Meta folder: params.json, n_shards consolidated.NN.pth split as Meta splits them
    (embedding on its dim, Llama 1/2 style), and checklist.chk in `md5sum -c` format; a folder
    that holds a checkpoint already is refused (new_checkpoint_dir) unless overwrite."""
    if not (is_int(n_shards) and n_shards >= 1):
        raise ValueError(f"n_shards={n_shards!r}: use a whole number, at least 1")
    for what, count in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
        if count % n_shards:
            raise ValueError(f"n_shards={n_shards} does not divide {what}={count}")
    dims = {k: 1 if k == "tok_embeddings.weight" else split_dim(k, t.shape, args) for k, t in state_dict.items()}
    for key, dim in dims.items():  # before anything is written: uneven pieces would not load again
        if dim is not None and state_dict[key].shape[dim] % n_shards:
            size = state_dict[key].shape[dim]
            raise ValueError(
                f"n_shards={n_shards} does not divide {key}'s {size} along the dim Meta's shards split: "
                f"use a number of shards that divides it (1 always does)"
            )
    out = new_checkpoint_dir(out_dir, overwrite)
    (out / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
    for i in range(n_shards):
        shard = {}
        for key, tensor in state_dict.items():
            dim = dims[key]
            piece = tensor if dim is None else tensor.chunk(n_shards, dim)[i]
            shard[key] = piece.detach().to("cpu").contiguous().clone()  # a view would save all
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    write_checklist(out)
    return out


def write_checklist(folder: Path) -> list[str]:
    """checklist.chk (`md5sum -c` format) over every other file in folder; returns their names."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{md5(folder / n)}  {n}\n" for n in names))
    return names
