"""Building a Transformer from what users hold, one function per source: a Meta checkpoint folder,
a quantized folder (llama.quantize's), a llama.cpp GGUF file, or params with random weights. Each
returns (model, tokenizer), the weights on the device in the dtype (LLaMa.build's defaults) and
quantized when asked, after refusing, before the model is allocated (a GGUF file is read first),
weights that would not fit in free memory beside the run's KV cache. LLaMa.build calls `load`.
"""

import logging
import os
from pathlib import Path

import torch

from llama.checkpoint import MetaCheckpoint, find_tokenizer, load_shard, read_params, read_params_file
from llama.cpu import weight_bytes
from llama.model import ModelArgs, Transformer
from llama.quantize import check_scheme, make_quantized, quantized_bytes, read_scheme
from llama.runtime import check_fits, resolve_device, resolve_dtype
from llama.tokenizer import TiktokenTokenizer, Tokenizer

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# params/ at the repository's top (a checkout, an editable install); llama/presets in an installed one
PRESETS_DIR = _HERE / "presets" if (_HERE / "presets").is_dir() else _HERE.parent / "params"
BUILTIN_MODEL = _HERE / "models" / "shakespeare"

Loaded = tuple[Transformer, Tokenizer | None]


def run_dtype(
    source: str | os.PathLike, tokenizer_path: str | os.PathLike | None, dtype: str | torch.dtype | None, device
) -> torch.dtype:
    """The dtype asked for, or the one Meta's code runs the model in on a GPU: float16 for Llama 1/2 and
    Code Llama, bfloat16 for Llama 3 (a tiktoken tokenizer) where the GPU computes in it natively
    (compute capability 8.0 on; float16 before). On the CPU bfloat16 and on MPS float16 (Meta's code
    runs on CUDA)."""
    device = torch.device(device)
    if dtype is not None or device.type != "cuda":
        return resolve_dtype(dtype, device)
    native_bf16 = torch.cuda.get_device_properties(device).major >= 8
    return torch.bfloat16 if native_bf16 and uses_tiktoken(source, tokenizer_path) else torch.float16


def uses_tiktoken(source: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> bool:
    """Whether a build of source would use Llama 3's tokenizer: tokenizer_path, the folder's
    tokenizer.model, or a GGUF file's vocabulary, read no further than the kind (a preset: no tokenizer)."""
    source = Path(source)
    if tokenizer_path is None and source.suffix.lower() == ".gguf" and source.is_file():
        from llama.convert.gguf import vocabulary_kind  # not at import: `python -m llama.convert.gguf` runs it

        return vocabulary_kind(source) == "gpt2"
    path = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(source) if source.is_dir() else None
    return path is not None and path.is_file() and Tokenizer.kind(path) is TiktokenTokenizer


def load(
    source: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    load_model: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    seed: int = 1,
    max_batch_size: int = 0,
    max_seq_len: int = 0,
) -> Loaded:
    """What LLaMa.build loads: random weights when not load_model, else by what source is (a .gguf
    file, a folder with quantization.json, or a Meta folder)."""
    path = Path(source)
    run = dict(device=device, dtype=dtype, quantize=quantize, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    if not load_model:
        return random_weights(path, tokenizer_path, seed=seed, **run)
    if path.suffix.lower() == ".gguf" and not path.is_dir():  # a missing file: load_gguf says so
        return load_gguf(path, tokenizer_path, **run)
    if path.is_dir() and read_scheme(path) is not None:
        return load_quantized_folder(path, tokenizer_path, **run)
    return load_meta_folder(path, tokenizer_path, **run)


def load_meta_folder(
    folder: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    max_batch_size: int = 0,
    max_seq_len: int = 0,
) -> Loaded:
    """A Meta folder of any number of shards, with the tokenizer.model beside it (or in its parent)."""
    device, dtype = _placement(device, dtype, quantize)
    checkpoint, tokenizer = open_meta_folder(folder, tokenizer_path)
    model = _empty(checkpoint.args, dtype, device, max_batch_size, max_seq_len)
    # Quantizing a shard that is used in place (mmap) keeps one float matrix resident at a time;
    # otherwise the float model is whole in memory first.
    in_place = quantize is not None and checkpoint.maps_in_place(dtype, device)
    nbytes = quantized_bytes(model, quantize) if in_place else None
    _allocate(model, device, max_batch_size, max_seq_len, nbytes)
    checkpoint.load_into(model)
    return _quantized(model, quantize), tokenizer


def open_meta_folder(
    folder: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> tuple[MetaCheckpoint, Tokenizer]:
    """A Meta folder's shards (mapped, not read) and the tokenizer whose vocabulary they fit."""
    path = Path(folder)
    if path.suffix.lower() == ".gguf" and path.is_file():
        raise ValueError(f"{path} is a GGUF file, not a Meta folder: LLaMa.build reads it, in one process")
    if path.is_dir() and read_scheme(path) is not None:
        raise ValueError(
            f"{path} is a quantized folder (quantization.json), not Meta's layout: LLaMa.build (or "
            "load_quantized_folder) reads it, in one process"
        )
    checkpoint = MetaCheckpoint(folder)
    args = checkpoint.args
    tokenizer = tokenizer_for(args, checkpoint.dir, tokenizer_path)
    if checkpoint.vocab_size != args.vocab_size:
        raise ValueError(
            f"the embedding in {checkpoint.dir} has {checkpoint.vocab_size} rows but the tokenizer {tokenizer.path} "
            f"has {args.vocab_size} words: pass the tokenizer.model that belongs to this model"
        )
    return checkpoint, tokenizer


def load_quantized_folder(
    folder: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    max_batch_size: int = 0,
    max_seq_len: int = 0,
) -> Loaded:
    """A folder llama.quantize.save_quantized wrote: its layers load already quantized."""
    device, dtype = _placement(device, dtype, quantize)
    folder = Path(folder)
    scheme = read_scheme(folder)
    if scheme is None:
        raise FileNotFoundError(f"no quantization.json in {folder}: it is not a quantized folder")
    if quantize is not None:
        raise ValueError(f"{folder} is already quantized ({scheme['scheme']}): leave out quantize=")
    args = read_params(folder)
    tokenizer = tokenizer_for(args, folder, tokenizer_path)
    model = make_quantized(
        _empty(args, dtype, device, max_batch_size, max_seq_len),
        scheme["scheme"],
        scheme.get("group_size") or 64,
        quantize=False,
    )
    _allocate(model, device, max_batch_size, max_seq_len)
    path = folder / "consolidated.00.pth"
    try:
        model.load_state_dict(load_shard(path), strict=True)  # the portable layout, read into the layers' own
    except RuntimeError as e:
        raise ValueError(f"{path} does not match {scheme}: {e}") from None
    return model, tokenizer


def load_gguf(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    max_batch_size: int = 0,
    max_seq_len: int = 0,
) -> Loaded:
    """A LLaMA GGUF file: weights dequantized into dtype, the tokenizer rebuilt from its vocabulary
    (or tokenizer_path's)."""
    from llama.convert.gguf import read_gguf  # not at import: `python -m llama.convert.gguf` runs it

    device, dtype = _placement(device, dtype, quantize)
    state_dict, args, proto = read_gguf(path, dtype)
    tokenizer = tokenizer_for(args, Path(path), tokenizer_path, proto)
    model = _allocate(_empty(args, dtype, device, max_batch_size, max_seq_len), device, max_batch_size, max_seq_len)
    model.load_state_dict(state_dict, strict=True)
    return _quantized(model, quantize), tokenizer


def random_weights(
    params: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    seed: int = 1,
    max_batch_size: int = 0,
    max_seq_len: int = 0,
) -> Loaded:
    """The architecture of a folder's params.json or of a preset in params/ ("llama-2-7b"), with
    seeded random weights (Transformer.init_weights); the tokenizer only when there is one."""
    device, dtype = _placement(device, dtype, quantize)
    path = Path(params)
    args = read_params(path) if path.is_dir() else preset_args(str(path))
    tokenizer = tokenizer_for(args, path, tokenizer_path, required=False)
    model = _allocate(_empty(args, dtype, device, max_batch_size, max_seq_len), device, max_batch_size, max_seq_len)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return _quantized(model, quantize), tokenizer


def preset_args(name: str) -> ModelArgs:
    """The architecture of a preset in params/ ("llama-2-7b")."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        where = f"presets: {', '.join(known)}" if known else f"no presets in {PRESETS_DIR}: the install is incomplete"
        raise FileNotFoundError(f"{name!r} is neither a checkpoint folder nor a preset; {where}")
    return read_params_file(path)


def tokenizer_for(
    args: ModelArgs,
    path: Path,
    tokenizer_path: str | os.PathLike | None,
    proto: bytes | None = None,
    required: bool = True,
) -> Tokenizer | None:
    """The tokenizer (given, in a GGUF file, or beside the folder); params.json's vocab_size -1 is
    resolved from it, and any other size must be its size."""
    if tokenizer_path is None and proto is None and path.is_dir():
        tokenizer_path = find_tokenizer(path)
        if tokenizer_path is None and required:
            raise FileNotFoundError(
                f"no tokenizer.model in {path} or {path.parent}: pass tokenizer_path= the tokenizer.model file"
            )
    if tokenizer_path is None and proto is None:
        if args.vocab_size == -1:
            raise ValueError(f"{path} has vocab_size -1, which is taken from the tokenizer: pass tokenizer_path=")
        return None
    tokenizer = Tokenizer(tokenizer_path or path, contents=None if tokenizer_path else proto)
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"params.json says vocab_size={args.vocab_size} but {tokenizer_path or path} has {tokenizer.n_words} "
            "words: pass the tokenizer.model that belongs to this model"
        )
    return tokenizer


def _placement(device: str | torch.device | None, dtype: str | torch.dtype | None, quantize: str | None):
    """The device and dtype named (or the defaults), with the scheme checked before any loading."""
    check_scheme(quantize)
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def _empty(args: ModelArgs, dtype: torch.dtype, device: torch.device, max_batch_size: int, max_seq_len: int):
    """The architecture on the meta device: shapes and dtypes, no memory. A model that could not fit
    even at 4 bits a weight is refused by arithmetic first (building a huge one on the meta device
    would take minutes). Logs the scaled RoPE's factor, which params.json may leave to the reader."""
    _check_fits(args, args.parameter_count() // 2, dtype, device, max_batch_size, max_seq_len, least=True)
    if args.use_scaled_rope:
        factor, source = args.rope_factor_and_source()
        logger.info("scaled RoPE, factor %g (%s); rope_scaling_factor in params.json sets another", factor, source)
    with torch.device("meta"):
        return Transformer(args).to(dtype)


def _allocate(
    model: Transformer, device: torch.device, max_batch_size: int, max_seq_len: int, nbytes: int | None = None
) -> Transformer:
    """Give the meta model its (uninitialised) memory on device, after refusing weights (nbytes when
    they will not be the model's own size) and a KV cache that exceed free memory."""
    nbytes = weight_bytes(model) if nbytes is None else nbytes
    _check_fits(model.params, nbytes, model.tok_embeddings.weight.dtype, device, max_batch_size, max_seq_len)
    return model.to_empty(device=device)


def _check_fits(args, nbytes: int, dtype, device: torch.device, max_batch_size: int, max_seq_len: int, least=False):
    cache_bytes = kv_cache_bytes(args, dtype, max_batch_size, max_seq_len)
    check_fits(nbytes, cache_bytes, device, f"max_batch_size={max_batch_size} x max_seq_len={max_seq_len}", least)


def kv_cache_bytes(
    args: ModelArgs, dtype: torch.dtype, max_batch_size: int, max_seq_len: int, kv_heads: int | None = None
):
    """What Transformer.setup_cache allocates: cache_k and cache_v [max_batch_size, kv heads, max_seq_len,
    head dim] per layer (kv_heads: a tensor-parallel rank's own, else all)."""
    kv_heads = args.kv_heads if kv_heads is None else kv_heads
    return 2 * args.n_layers * max_batch_size * kv_heads * max_seq_len * args.head_dim * dtype.itemsize


def _quantized(model: Transformer, quantize: str | None) -> Transformer:
    return model if quantize is None else make_quantized(model, quantize)
