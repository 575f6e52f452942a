"""Hugging Face LlamaForCausalLM folders <-> Meta checkpoint folders: weights, config and tokenizer.

Everything is a rename except wq/wk, whose rows are reordered per head: Meta rotates interleaved
pairs (x0, x1), (x2, x3), ... and HF rotates the two halves of each head (rotate_half). Mirrors
transformers' convert_llama_weights_to_hf.py, in both directions. H heads, D head dim. Llama 3's
tiktoken tokenizer.model travels as a tokenizer.json (llama.convert.bpe).
"""

import json
import logging
import os
from pathlib import Path

import torch

from llama.checkpoint import (
    cast,
    check_out_dir,
    copy_tokenizer,
    find_tokenizer,
    load_merged,
    save_checkpoint,
    write_checklist,
)
from llama.convert import bpe, run_cli
from llama.model import LLAMA3_ROPE_SCALING, ModelArgs, ffn_hidden_dim
from llama.tokenizer import TiktokenTokenizer, Tokenizer

logger = logging.getLogger(__name__)

TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {  # under layers.N. (Meta) and model.layers.N. (HF)
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
HF_DROPPED = ("rotary_emb.inv_freq",)  # older HF saves store their rotation table; we compute it
# Llama 3.1's frequency scaling (llama.model.apply_scaling), as transformers writes it.
LLAMA3_ROPE = {"rope_type": "llama3", **LLAMA3_ROPE_SCALING}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def hf_names(n_layers: int) -> dict[str, str]:
    """Every Meta state-dict key and the Hugging Face key of the same weight."""
    names = {f"{meta}.weight": f"{hf}.weight" for meta, hf in TOP_NAMES.items()}
    for i in range(n_layers):
        names.update({f"layers.{i}.{m}.weight": f"model.layers.{i}.{h}.weight" for m, h in LAYER_NAMES.items()})
    return names


def permute_rope(w: torch.Tensor, n_heads: int, to_hf: bool = True) -> torch.Tensor:
    """Reorder each head's rows from Meta's interleaved pairs (0, 1), (2, 3), ... to HF's halves
    (0, 2, 4, ... | 1, 3, 5, ...); to_hf=False is the exact inverse."""
    rows, cols = w.shape
    pairs = (rows // n_heads // 2, 2) if to_hf else (2, rows // n_heads // 2)
    # [H * D, cols] -> [H, D/2, 2, cols] -> [H, 2, D/2, cols] (and back), rows only.
    return w.reshape(n_heads, *pairs, cols).transpose(1, 2).reshape(rows, cols)


def _rename(weights: dict[str, torch.Tensor], args: ModelArgs, to_hf: bool) -> dict[str, torch.Tensor]:
    """Every weight under the other layout's name, wq/wk rows reordered for the other RoPE."""
    names = hf_names(args.n_layers)
    expected = set(names) if to_hf else set(names.values())
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        what = "Meta" if to_hf else "Hugging Face"
        raise ValueError(f"the {what} weights are not LLaMA's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for meta, hf in names.items():
        src, dst = (meta, hf) if to_hf else (hf, meta)
        heads = {"wq": args.n_heads, "wk": args.kv_heads}.get(meta.split(".")[-2])
        out[dst] = weights[src] if heads is None else permute_rope(weights[src], heads, to_hf)
    return out


def ffn_params(intermediate_size: int, dim: int, hint: dict | None = None) -> dict:
    """multiple_of (and ffn_dim_multiplier when needed) for which Meta's sizing gives intermediate_size:
    the hint when it does, else the plainest form that does (no multiplier, then fewest decimals,
    each with the largest power-of-two multiple_of)."""
    candidates = []
    if isinstance(intermediate_size, int) and intermediate_size > 0 and dim > 0:
        base = ffn_hidden_dim(dim, 1)  # 2/3 of 4 * dim
        ratio = intermediate_size / base
        # The last multiplier lands int(multiplier * base) mid-way on intermediate_size: always exact.
        multipliers = [None, *(round(ratio, k) for k in range(1, 7)), (intermediate_size + 0.5) / base]
        multipliers = [m for m in multipliers if m is None or m > 0]  # a tiny size's ratio rounds to 0
        candidates = [(2**p, m) for m in multipliers for p in range(12, -1, -1)]
        if hint and hint.get("multiple_of"):
            candidates.insert(0, (hint["multiple_of"], hint.get("ffn_dim_multiplier")))
    for multiple_of, multiplier in candidates:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate_size:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise ValueError(
        f"intermediate_size={intermediate_size!r} with dim={dim}: no multiple_of/ffn_dim_multiplier "
        "gives it (it must be a positive integer)"
    )


def config_to_args(config: dict) -> ModelArgs:
    """ModelArgs for a LlamaForCausalLM config.json, refusing what Meta's layout cannot hold."""
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in architectures:
        raise ValueError(
            f"model_type={config.get('model_type')!r}, architectures={architectures}: "
            "only LlamaForCausalLM (model_type 'llama') folders convert to Meta's layout"
        )
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}: a LlamaForCausalLM config has them")
    for key in (*REQUIRED, "num_key_value_heads", "head_dim"):
        value = config.get(key)
        given = key in REQUIRED or value is not None
        if given and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"config.json's {key}={value!r}: a LlamaForCausalLM config gives a positive integer")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true: LLaMA's layout has no biases, so this model cannot be written as Meta's")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}: LLaMA's feed-forward is SwiGLU (silu)")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if dim % n_heads or (config.get("head_dim") or dim // n_heads) != dim // n_heads:
        raise ValueError(
            f"head_dim={config.get('head_dim')} with hidden_size={dim}, num_attention_heads={n_heads}: "
            "Meta's layout needs head_dim == hidden_size / num_attention_heads"
        )

    # transformers 5 keeps rope_theta and the scaling in rope_parameters; 4.x in rope_theta, rope_scaling.
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    factor = rope.get("factor")
    scaled = rope == {**LLAMA3_ROPE, "factor": factor}  # Llama 3.1's scaling, any factor (3.2's is 32)
    if rope["rope_type"] != "default" and not scaled:
        raise ValueError(f"rope scaling {rope} is not supported: Meta's layout knows only Llama 3's {LLAMA3_ROPE}")
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    hint = {k: config[k] for k in ("multiple_of", "ffn_dim_multiplier") if config.get(k) is not None}
    args = ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        vocab_size=config["vocab_size"],
        **ffn_params(config["intermediate_size"], dim, hint),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        use_scaled_rope=scaled,
    )
    if scaled and factor != args.rope_factor:  # params.json says it only where the shape does not
        args.rope_scaling_factor = float(factor)
    return args


def args_to_config(args: ModelArgs, vocab_size: int, dtype: torch.dtype) -> dict:
    """A LlamaForCausalLM config.json for Meta's params, readable by transformers 5 and 4.x alike."""
    rope = {**LLAMA3_ROPE, "factor": args.rope_factor, "rope_theta": args.rope_theta} if args.use_scaled_rope else None
    default_positions = 131072 if args.use_scaled_rope else 4096  # 3.1's, above its scaling's 8192
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": rope or {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,
        "rope_scaling": rope,  # what transformers 4 reads
        "max_position_embeddings": args.extra.get("max_seq_len", default_positions),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "multiple_of": args.multiple_of,  # Meta's own FFN sizing, so the way back is exact
    }
    if args.ffn_dim_multiplier is not None:
        config["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    return config


def meta_to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict]:
    """LlamaForCausalLM weights and config.json for Meta's merged weights and params."""
    hf = _rename(state_dict, args, to_hf=True)
    embedding = state_dict["tok_embeddings.weight"]  # its rows, not params.json's vocab_size, which may be -1
    return hf, args_to_config(args, embedding.shape[0], embedding.dtype)


def hf_to_meta(hf_state_dict: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Meta's weights and params for a LlamaForCausalLM state dict and config.json."""
    args = config_to_args(config)
    weights = {k: v for k, v in hf_state_dict.items() if not k.endswith(HF_DROPPED)}
    if config.get("tie_word_embeddings", False) and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # Meta keeps two matrices
    return _rename(weights, args, to_hf=False), args


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "Hugging Face folders are read and written with safetensors: pip install safetensors "
            "(or pip install 'llama-reference[convert]')"
        ) from None
    return safetensors.torch


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}: a Hugging Face model folder has one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _tokenizer_to_hf(source: Path | None, out: Path) -> Tokenizer | None:
    """The Meta folder's tokenizer as transformers reads it: a SentencePiece tokenizer.model as it
    is, with a tokenizer_config.json for LlamaTokenizer; Llama 3's tiktoken file as tokenizer.json +
    tokenizer_config.json; and generation_config.json, whose eos_token_id lists every stop id (Llama
    3 Instruct's turns end at <|eot_id|>, not only at <|end_of_text|>)."""
    if source is None or not source.is_file():
        logger.warning("no tokenizer.model found to write into %s", out)
        return None
    tokenizer = Tokenizer(source)
    if isinstance(tokenizer, TiktokenTokenizer):
        bpe.write_tokenizer_json(tokenizer, out)
    else:
        copy_tokenizer(source, out)
        (out / "tokenizer_config.json").write_text(json.dumps(_sentencepiece_config(tokenizer), indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return tokenizer


def _sentencepiece_config(tokenizer: Tokenizer) -> dict:
    """What transformers' LlamaTokenizer needs to encode as Meta's SentencePiece tokenizer does: BOS
    first (without this file it adds none), text that spells a special token kept as text, and the
    model's own dummy prefix (the "▁" Llama's tokenizers put before the text; a model trained
    without it, like the built-in one, puts none)."""
    sp = tokenizer.sp_model
    specials = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": sp.unk_id()}
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **{name: sp.id_to_piece(i) for name, i in specials.items() if i >= 0},
        "split_special_tokens": True,
        "add_prefix_space": sp.encode_as_pieces("a")[0].startswith("▁"),
    }


def _tokenizer_from_hf(src: Path) -> bytes | None:
    """tokenizer.model's bytes for the Meta folder: the Hugging Face folder's own (Llama 2's
    SentencePiece), else Llama 3's tiktoken file rebuilt from a byte-level tokenizer.json."""
    if (src / "tokenizer.model").is_file():
        return (src / "tokenizer.model").read_bytes()
    if (src / "tokenizer.json").is_file():
        contents = bpe.tiktoken_from_tokenizer_json(_read_json(src / "tokenizer.json"), src / "tokenizer.json")
        if contents is not None:
            return contents
        logger.warning(
            "%s is not Llama 3's byte-level BPE: pass tokenizer_path= a tokenizer.model", src / "tokenizer.json"
        )
    else:
        logger.warning("no tokenizer.model or tokenizer.json in %s: the Meta folder gets no tokenizer", src)
    return None


def hf_folder_to_meta(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, n_shards: int = 1, dtype: str | torch.dtype | None = None
) -> Path:
    """Write a Meta folder (params.json, n_shards consolidated.NN.pth, tokenizer.model if there is
    one, Llama 3's rebuilt from tokenizer.json) from a Hugging Face LlamaForCausalLM folder of
    *.safetensors; dtype None keeps theirs."""
    src = Path(hf_dir)
    check_out_dir(out_dir)  # before any weight is read
    config = _read_json(src / "config.json")
    try:
        config_to_args(config)  # refuse a config or a tokenizer we cannot convert before reading any weights
    except ValueError as e:
        raise ValueError(f"{src / 'config.json'}: {e}") from None
    tokenizer_model = _tokenizer_from_hf(src)
    index = src / "model.safetensors.index.json"
    files = sorted({src / f for f in _read_json(index)["weight_map"].values()}) if index.is_file() else []
    files = files or sorted(src.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {src}: re-save the model with save_pretrained()")
    load_file, weights = _safetensors().load_file, {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is named in {index} but does not exist")
        try:
            weights.update(load_file(path))
        except Exception as e:  # safetensors' own error type, whose module may change
            raise ValueError(f"cannot read {path} ({e}): it is truncated or damaged; download it again") from None
    state_dict, args = hf_to_meta(weights, config)
    out = save_checkpoint(cast(state_dict, dtype), args, out_dir, n_shards)
    if tokenizer_model is not None:
        (out / "tokenizer.model").write_bytes(tokenizer_model)
        write_checklist(out)
    logger.info("wrote %s from %s: %d shard(s)", out, src, n_shards)
    return out


def meta_folder_to_hf(
    meta_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> Path:
    """Write config.json, model.safetensors and the tokenizer (tokenizer.model for SentencePiece,
    tokenizer.json for Llama 3's) for a Meta folder of any number of shards, with the tokenizer.model
    from the folder or its parent; dtype None keeps the checkpoint's."""
    save_file = _safetensors().save_file
    out = check_out_dir(out_dir)  # never where a model is, the source included
    state_dict, args = load_merged(meta_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_to_hf(find_tokenizer(Path(meta_dir)), out)
    weights, config = meta_to_hf(cast(state_dict, dtype), args)
    if tokenizer is not None:
        config |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    logger.info("wrote %s from %s", out, meta_dir)
    return out


if __name__ == "__main__":
    run_cli({"to_meta": hf_folder_to_meta, "to_hf": meta_folder_to_hf})
