"""Meta checkpoint folders <-> llama.cpp's GGUF, with the `gguf` package (llama.cpp's own writer,
reader and dequantizers).

GGUF keeps Meta's interleaved RoPE row order (llama.cpp's converter from Hugging Face undoes HF's
permutation), so weights are renamed, not permuted. GGUF lists a tensor's dims row length first
(ne[0]); the package's arrays are [out, in], as Meta's. Hyperparameters and the vocabulary
(SentencePiece's as "llama", Llama 3's tiktoken BPE as "gpt2") travel as metadata, Llama 3.1's RoPE
scaling as llama.cpp's rope_freqs tensor; params.json and tokenizer.model are rebuilt from them.
"""

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llama.checkpoint import cast, check_out_dir, find_tokenizer, load_merged, save_checkpoint, write_checklist
from llama.convert import bpe, run_cli
from llama.convert.hf import ffn_params
from llama.model import ModelArgs, Transformer, precompute_freqs_cis
from llama.tokenizer import TiktokenTokenizer, Tokenizer

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Meta key (with {i} for the layer) -> GGUF tensor name.
TENSOR_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}
META_NAMES = {name: key for key, name in TENSOR_NAMES.items()}
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
# Meta's own FFN sizing, which llama.feed_forward_length alone does not pin down (ours, not llama.cpp's).
FFN_KEYS = ("meta.multiple_of", "meta.ffn_dim_multiplier")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.1's scaling)
SPECIAL_IDS = {"unk": "unknown", "bos": "bos", "eos": "eos", "pad": "padding"}  # tokenizer.ggml.{}_token_id


def rename(name: str, to_gguf: bool = True) -> str | None:
    """A tensor's name in the other layout (Meta's -> GGUF's, or back), or None if it has none."""
    table = TENSOR_NAMES if to_gguf else META_NAMES
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():  # layers.N.* / blk.N.*
        template = table.get(".".join([parts[0], "{i}", *parts[2:]]))
        return None if template is None else template.format(i=parts[1])
    return table.get(name)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "GGUF is read and written with the gguf package: pip install 'llama-reference[convert]'"
        ) from None
    return gguf


def _sentencepiece_proto():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ImportError(
            "a SentencePiece vocabulary is read and written with protobuf: pip install protobuf "
            "(or pip install 'llama-reference[convert]')"
        ) from None
    return sentencepiece_model_pb2


def write_gguf(
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    tokenizer: Tokenizer,
    out_path: str | os.PathLike,
    tensor_type: str = "F16",
    context_length: int = 4096,
) -> Path:
    """Write a LLaMA GGUF file: tensor_type F32, F16, BF16, Q8_0 or Q4_0 for the 2-D weights."""
    gguf = _gguf()
    if tensor_type not in TYPES:
        raise ValueError(f"tensor_type={tensor_type!r}: use one of {', '.join(TYPES)}")
    unnamed = [key for key in state_dict if rename(key) is None]
    if unnamed:
        raise ValueError(f"{unnamed[:5]} are not LLaMA weights that GGUF has names for")
    qtype = gguf.GGMLQuantizationType[tensor_type]
    out = Path(out_path)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(out.stem)
    writer.add_context_length(context_length)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_vocab_size(state_dict["tok_embeddings.weight"].shape[0])  # params.json may say -1
    writer.add_uint32(FFN_KEYS[0], args.multiple_of)
    if args.ffn_dim_multiplier is not None:
        writer.add_float64(FFN_KEYS[1], args.ffn_dim_multiplier)
    writer.add_file_type(
        gguf.LlamaFileType[f"MOSTLY_{tensor_type}"] if tensor_type != "F32" else gguf.LlamaFileType.ALL_F32
    )
    _write_vocab(writer, tokenizer)
    if args.use_scaled_rope:  # as llama.cpp keeps Llama 3.1's scaling: a divisor for each frequency
        writer.add_tensor(ROPE_FREQS, rope_divisors(args, args.rope_factor).numpy())
    for key, tensor in state_dict.items():
        data = tensor.detach().float().cpu().numpy()
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype  # norms stay float32, as llama.cpp expects
        try:
            data = gguf.quants.quantize(data, kind)
        except gguf.quants.QuantError:  # rows not whole blocks: F16, as llama.cpp's converter falls back
            kind, data = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        writer.add_tensor(rename(key), data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_vocab(writer: "gguf.GGUFWriter", tokenizer: Tokenizer) -> None:
    """The SentencePiece model as llama.cpp's "llama" vocabulary, with what its normalizer does;
    Llama 3's tiktoken file as its "gpt2" byte-level BPE with the "llama-bpe" pre-tokenizer."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return _write_bpe_vocab(writer, tokenizer)
    gguf, pb = _gguf(), _sentencepiece_proto()
    proto = pb.ModelProto.FromString(tokenizer.sp_model.serialized_model_proto())
    piece_type = pb.ModelProto.SentencePiece.Type
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(gguf.TokenType[piece_type.Name(p.type)]) for p in proto.pieces])  # same names
    for name, key in SPECIAL_IDS.items():
        special_id = getattr(tokenizer.sp_model, f"{name}_id")()
        if special_id >= 0:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", special_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    normalizer = proto.normalizer_spec
    writer.add_add_space_prefix(normalizer.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(normalizer.remove_extra_whitespaces)
    if normalizer.precompiled_charsmap:  # Llama's is empty (identity); a model trained with NFKC has one
        writer.add_precompiled_charsmap(normalizer.precompiled_charsmap)


def _write_bpe_vocab(writer: "gguf.GGUFWriter", tokenizer: TiktokenTokenizer) -> None:
    gguf = _gguf()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")  # llama.cpp's name for Llama 3's pre-tokenizer pattern
    writer.add_token_list(bpe.vocabulary(tokenizer))
    kinds = [gguf.TokenType.NORMAL] * len(tokenizer.ranks) + [gguf.TokenType.CONTROL] * len(tokenizer.special_tokens)
    writer.add_token_types([int(kind) for kind in kinds])
    writer.add_token_merges([f"{bpe.spell(a)} {bpe.spell(b)}" for a, b in bpe.merges(tokenizer.ranks)])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_eom_token_id(tokenizer.eom_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def read_gguf(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], ModelArgs, bytes]:
    """Meta's weights, params and tokenizer.model bytes from a LLaMA GGUF file. Quantized tensors are
    dequantized with the gguf package's own routines, each cast to dtype as it is read (None: float32,
    or the file's F16/BF16), so memory never holds more than one float32 tensor beyond the result."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise ValueError(
            f"cannot read {path} as GGUF ({e}): it is truncated, corrupt or not GGUF, or it needs a newer gguf package"
        ) from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{path} holds a {architecture!r} model: only general.architecture 'llama' converts to Meta's layout"
        )
    tokenizer_model = _read_vocab(meta, path)
    divisors = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    keys = {t.name: rename(t.name, to_gguf=False) for t in reader.tensors if t is not divisors}
    unknown = [name for name, key in keys.items() if key is None]
    if unknown:
        raise ValueError(f"{path} holds tensors that are not in Meta's LLaMA layout: {unknown[:5]}")
    tensors = {keys[t.name]: t for t in reader.tensors if t is not divisors}
    embedding = tensors.get("tok_embeddings.weight")
    args = _read_args(meta, path, None if embedding is None else int(embedding.shape[-1]))  # its rows
    if divisors is not None:
        _read_rope_scaling(args, torch.from_numpy(np.array(divisors.data, dtype=np.float32)), path)
    with torch.device("meta"):  # every key and shape the metadata implies, checked before any data is read
        expected = {key: tuple(w.shape) for key, w in Transformer(args).state_dict().items()}
    tied = "output.weight" not in tensors and embedding is not None  # as llama.cpp writes tied embeddings
    missing = sorted(expected.keys() - tensors.keys() - ({"output.weight"} if tied else set()))
    wrong = [f"{t.name} {_shape(t)}" for key, t in tensors.items() if _shape(t) != expected.get(key)]
    if missing or wrong:
        raise ValueError(
            f"{path} does not match its own metadata: missing {missing[:5]}, unexpected or misshapen {wrong[:5]}"
        )
    state_dict = {key: cast({key: _read_tensor(t, path)}, dtype)[key] for key, t in tensors.items()}
    if tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()  # Meta keeps two matrices
    return state_dict, args, tokenizer_model


def rope_divisors(args: ModelArgs, factor: float) -> torch.Tensor:
    """What llama.cpp's rope_freqs tensor holds for Llama 3.1's scaling: each RoPE frequency over
    its scaled value (model.apply_scaling), 1 for the high ones, the factor for the low ones."""
    plain = precompute_freqs_cis(args.head_dim, 2, args.rope_theta).angle()[1]  # position 1's angles: the frequencies
    return plain / precompute_freqs_cis(args.head_dim, 2, args.rope_theta, True, factor).angle()[1]


def _read_rope_scaling(args: ModelArgs, divisors: torch.Tensor, path: Path) -> None:
    """Llama 3.1's scaling from a rope_freqs tensor, if it is that scaling (with any factor)."""
    factor = float(divisors.max())
    if divisors.shape != (args.head_dim // 2,) or not torch.allclose(divisors, rope_divisors(args, factor), rtol=1e-5):
        raise ValueError(f"{path}: its {ROPE_FREQS} is not Llama 3.1's RoPE scaling, which Meta's params.json can say")
    args.use_scaled_rope = True
    if factor != args.rope_factor:
        args.rope_scaling_factor = factor


def _shape(tensor: "gguf.ReaderTensor") -> tuple[int, ...]:
    """Meta's [out, in]: GGUF lists dims row length (ne[0]) first."""
    return tuple(reversed(tensor.shape.tolist()))


def _read_tensor(tensor: "gguf.ReaderTensor", path: Path) -> torch.Tensor:
    gguf, shape, kind = _gguf(), _shape(tensor), tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)  # a copy: the file is mmapped
    if kind == gguf.GGMLQuantizationType.BF16:  # raw bytes, as numpy has no bfloat16
        return torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16).reshape(shape)
    try:
        return torch.from_numpy(gguf.quants.dequantize(tensor.data, kind)).reshape(shape)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name} has type {kind.name}, which the gguf package cannot "
            "dequantize; re-quantize the model to a supported type such as Q8_0"
        ) from None


def _float32(value: float) -> float:
    """The shortest decimal that a GGUF float32 stands for: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _read_args(meta: dict, path: Path, vocab_size: int | None) -> ModelArgs:
    keys = (
        "embedding_length",
        "block_count",
        "attention.head_count",
        "feed_forward_length",
        "attention.layer_norm_rms_epsilon",
    )
    missing = [f"llama.{k}" for k in keys if f"llama.{k}" not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}: a LLaMA GGUF file has them")
    dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    head_dim = meta.get("llama.rope.dimension_count", dim // n_heads)
    if dim % n_heads or head_dim != dim // n_heads:
        raise ValueError(
            f"{path}: rope dimension {head_dim} with embedding {dim} and {n_heads} heads; "
            "Meta's layout needs head_dim == dim / n_heads"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: rope scaling {scaling!r} has no counterpart in Meta's params.json")
    hint = {k.removeprefix("meta."): meta.get(k) for k in FFN_KEYS}
    return ModelArgs(
        dim=dim,
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        vocab_size=len(meta["tokenizer.ggml.tokens"]) if vocab_size is None else vocab_size,
        **ffn_params(meta["llama.feed_forward_length"], dim, hint),
        norm_eps=_float32(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=_float32(meta.get("llama.rope.freq_base", 10000.0)),
    )


def vocabulary_kind(path: str | os.PathLike) -> str | None:
    """A GGUF file's tokenizer.ggml.model ("llama": SentencePiece; "gpt2": Llama 3's byte-level BPE),
    its tensors left unread; None where the file has none or cannot be read (read_gguf says why)."""
    try:
        field = _gguf().GGUFReader(path).fields.get("tokenizer.ggml.model")
    except (ValueError, IndexError, KeyError, OverflowError, OSError):
        return None
    return None if field is None else field.contents()


def _read_vocab(meta: dict, path: Path) -> bytes:
    """A tokenizer.model's bytes for the file's vocabulary: a serialized SentencePiece ModelProto for
    a "llama" one, Llama 3's tiktoken file for a "gpt2" one (its byte-level BPE: ranks are the ids)."""
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise ValueError(f"{path} lacks tokenizer.ggml.tokens: without its vocabulary it gives no tokenizer.model")
    if model == "gpt2":
        return _read_bpe_vocab(meta, path)
    if model != "llama":
        raise ValueError(
            f"{path} has a {model!r} vocabulary: only SentencePiece ('llama', as in Llama 1/2 and Code Llama) "
            "and Llama 3's byte-level BPE ('gpt2') vocabularies can be written as a tokenizer.model"
        )
    gguf, pb = _gguf(), _sentencepiece_proto()
    proto = pb.ModelProto()
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    types = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    piece_type = pb.ModelProto.SentencePiece.Type
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=piece_type.Value(gguf.TokenType(kind).name))
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = gguf.TokenType.BYTE in types
    for name, key in SPECIAL_IDS.items():  # absent: SentencePiece's defaults, which are Meta's ids
        special_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if special_id is not None and 0 <= special_id < len(tokens):  # looked up by piece: set both
            setattr(trainer, f"{name}_id", special_id)
            setattr(trainer, f"{name}_piece", tokens[special_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"  # informational: SentencePiece applies precompiled_charsmap, if any
    normalizer.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    normalizer.remove_extra_whitespaces = meta.get("tokenizer.ggml.remove_extra_whitespaces", False)
    normalizer.precompiled_charsmap = bytes(meta.get("tokenizer.ggml.precompiled_charsmap", []))
    return proto.SerializeToString()


def _read_bpe_vocab(meta: dict, path: Path) -> bytes:
    gguf, tokens = _gguf(), meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    n_base = next((i for i, kind in enumerate(types) if kind != gguf.TokenType.NORMAL), len(tokens))
    bpe.check_specials(tokens[n_base:], str(path))
    return bpe.tiktoken_file(tokens[:n_base])


def gguf_to_meta_folder(
    path: str | os.PathLike, out_dir: str | os.PathLike, n_shards: int = 1, dtype: str | torch.dtype | None = "bfloat16"
) -> Path:
    """Write a Meta folder (params.json, n_shards consolidated.NN.pth, tokenizer.model and a
    checklist.chk covering them all) from a LLaMA GGUF file; dtype None keeps the file's (float32
    where it is quantized)."""
    check_out_dir(out_dir)  # before the file is read
    state_dict, args, tokenizer_model = read_gguf(path, dtype)
    out = save_checkpoint(state_dict, args, out_dir, n_shards)
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    write_checklist(out)
    logger.info("wrote %s from %s: %d shard(s)", out, path, n_shards)
    return out


def meta_folder_to_gguf(meta_dir: str | os.PathLike, out_path: str | os.PathLike, type: str = "F16") -> Path:
    """Write one GGUF file (type F32, F16, BF16, Q8_0 or Q4_0) for a Meta folder of any number of
    shards, with tokenizer.model from the folder or its parent."""
    if Path(out_path).exists():
        raise ValueError(f"{out_path} exists: write the GGUF file to a new path")
    tokenizer = find_tokenizer(Path(meta_dir))
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.model in {meta_dir} or its parent: GGUF files carry the vocabulary")
    state_dict, args = load_merged(meta_dir)
    out = write_gguf(state_dict, args, Tokenizer(tokenizer), out_path, str(type).upper())
    logger.info("wrote %s from %s", out, meta_dir)
    return out


if __name__ == "__main__":
    run_cli({"to_meta": gguf_to_meta_folder, "from_meta": meta_folder_to_gguf})
