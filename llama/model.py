"""The LLaMA network, single-device, mirroring Meta's llama/model.py line for line in semantics.

Layout letters: B batch, T time (new tokens), S cached positions, H heads, Hkv kv-heads,
D head dim. The KV cache is owned by each Attention and allocated by `setup_cache`, never by
the constructor, so building the architecture costs no memory for a run that has not started.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    """What params.json says, and nothing else (batch size, length, device belong to the run)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: take the tokenizer's size
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling
    rope_scaling_factor: float | None = None  # its factor; None: rope_factor's choice (Meta's name, from Llama 4)
    extra: dict = field(default_factory=dict)  # params.json keys this version does not use

    def __post_init__(self):
        """Refuse what no LLaMA can be, naming the field: the one check of params.json's values."""
        optional = [
            name for name in ("n_kv_heads", "ffn_dim_multiplier", "rope_scaling_factor") if getattr(self, name) is None
        ]
        for name in {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"} - set(optional):
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)!r}: use a positive integer")
        if not (is_int(self.vocab_size) and (self.vocab_size > 0 or self.vocab_size == -1)):
            raise ValueError(f"vocab_size={self.vocab_size!r}: use a positive integer, or -1 for the tokenizer's size")
        for name in {"norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"} - set(optional):
            if not (_is_number(getattr(self, name)) and 0 < getattr(self, name) < math.inf):
                raise ValueError(f"{name}={getattr(self, name)!r}: use a positive number")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(
                f"use_scaled_rope={self.use_scaled_rope!r}: use true or false (JSON booleans, not strings)"
            )
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim={self.dim} with n_heads={self.n_heads}: each head needs an even size, dim / n_heads")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        try:
            hidden = self.ffn_hidden_dim
        except OverflowError:  # an infinite product
            hidden = 0
        if hidden < 1:
            raise ValueError(
                f"ffn_dim_multiplier={self.ffn_dim_multiplier!r} leaves no feed-forward width: use about 1"
            )

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        if not isinstance(params, dict):
            raise ValueError(f"params.json holds a {type(params).__name__}, not an object of Meta's fields")
        known = {f.name for f in fields(cls)} - {"extra"}
        args = cls(**{k: v for k, v in params.items() if k in known})
        args.extra = {k: v for k, v in params.items() if k not in known}
        return args

    def to_params(self) -> dict:
        """The params.json dict: the fields Meta writes, then any unused keys we were given."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if out["n_kv_heads"] is None:
            del out["n_kv_heads"]
        if out["ffn_dim_multiplier"] is None:
            del out["ffn_dim_multiplier"]
        if not out["use_scaled_rope"]:
            del out["use_scaled_rope"]
        if out["rope_scaling_factor"] is None:
            del out["rope_scaling_factor"]
        return {**out, **self.extra}

    @property
    def rope_factor(self) -> float:
        return self.rope_factor_and_source()[0]

    def rope_factor_and_source(self) -> tuple[float, str]:
        """The scaled RoPE's factor and where it comes from: rope_scaling_factor when params.json
        gives one, else 32 for Llama 3.2 1B and 3B (LLAMA3_2_SHAPES), else Meta's code's 8."""
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor, "params.json's rope_scaling_factor"
        name = LLAMA3_2_SHAPES.get((self.dim, self.n_layers, self.n_heads, self.kv_heads))
        if name is not None:
            return 32.0, f"{name}'s shape"
        return LLAMA3_ROPE_SCALING["factor"], "Meta's code's, right for Llama 3.1 and 3.3"

    def parameter_count(self) -> int:
        """Every weight of the network, by arithmetic (no model built): output and embedding apart."""
        kv, hidden = self.kv_heads * self.head_dim, self.ffn_hidden_dim
        layer = 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * hidden + 2 * self.dim
        return self.n_layers * layer + self.dim + 2 * max(self.vocab_size, 0) * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU sizing: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Llama 3.1's RoPE scaling constants (Meta's, "obtained from grid search"), under the names Hugging
# Face configs give them: apply_scaling reads them, llama.convert.hf writes them. The factor is the
# default of ModelArgs.rope_factor.
LLAMA3_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Llama 3.2 1B and 3B were trained with a factor of 32, which their params.json cannot say (it has
# only use_scaled_rope) and Meta's reference code does not apply (it hard-codes 8); Meta's
# maintainers confirmed 32 (meta-llama/llama-models issues 166 and 241). Their (dim, n_layers,
# n_heads, n_kv_heads), from Meta's released params.json:
LLAMA3_2_SHAPES = {(2048, 16, 32, 8): "Llama 3.2 1B", (3072, 28, 24, 8): "Llama 3.2 3B"}


def is_int(value) -> bool:
    """An int and not a bool (JSON's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: Meta's order, which bf16 results depend on.
        return self._norm(x.float()).type_as(x) * self.weight


def apply_scaling(freqs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Llama 3.1's RoPE scaling, as Meta's llama3/model.py writes it: slow the low frequencies by
    scale_factor, keep the high ones, blend in between (Meta's Llama 4 code passes the factor in)."""
    low_freq_factor = LLAMA3_ROPE_SCALING["low_freq_factor"]
    high_freq_factor = LLAMA3_ROPE_SCALING["high_freq_factor"]
    old_context_len = LLAMA3_ROPE_SCALING["original_max_position_embeddings"]  # original llama3 length

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.where(
        (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
        (1 - smooth) * new_freqs / scale_factor + smooth * new_freqs,
        new_freqs,
    )


def precompute_freqs_cis(
    dim: int,
    end: int,
    theta: float = 10000.0,
    use_scaled: bool = False,
    scale_factor: float = LLAMA3_ROPE_SCALING["factor"],
) -> torch.Tensor:
    """Unit complex rotations [end, dim/2] for positions 0..end-1, computed in float32 on the CPU."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor)
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of each head as complex numbers."""
    # [B, T, H, D] -> [B, T, H, D/2] complex; freqs_cis [T, D/2] broadcasts over B and H.
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[None, :, None, :]
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # [max_batch_size, Hkv, max_seq_len, D], set by Transformer.setup_cache.
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.project(x)
        xq, xk = self.rotate(xq, xk, freqs_cis)
        # [B, T, H, D] -> [B, H, T, D], the layout attention and the cache use.
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)

        if self.cache_k is not None:
            self.cache_k[:bsz, :, start_pos : start_pos + seqlen] = xk
            self.cache_v[:bsz, :, start_pos : start_pos + seqlen] = xv
            keys = self.cache_k[:bsz, :, : start_pos + seqlen]
            values = self.cache_v[:bsz, :, : start_pos + seqlen]
        else:
            keys, values = xk, xv

        output = self.attend(xq, keys, values, mask)
        return self.wo(output.transpose(1, 2).reshape(bsz, seqlen, -1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> queries [B, T, H, D], keys and values [B, T, Hkv, D]."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        return xq, xk, xv

    # rotate and attend are where llama.cpu puts its bf16 kernels (as a subclass).
    def rotate(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_emb(xq, xk, freqs_cis)

    def attend_rows(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        """A decode step's attention, row b over its first lengths[b] positions alone: xq [B, H, 1, D],
        keys and values [B, Hkv, S, D], lengths [B] (continuous batching: rows at their own positions)."""
        visible = torch.arange(keys.shape[2], device=keys.device) < lengths[:, None]
        return self.attend(xq, keys, values, visible[:, None, None])

    def attend(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        """softmax(q k^T / sqrt(D) + mask) v: [B, H, T, D] over keys and values [B, Hkv, S, D]; the
        mask is the same for every head ([T, S] or [B, 1, T, S])."""
        # each group of n_heads / n_kv_heads query heads shares one kv head (GQA)
        bsz, _, seqlen, _ = xq.shape
        group = self.n_heads // self.n_kv_heads
        if seqlen == 1 and group > 1:
            # A decode step: each kv head's query heads as its rows ([B, Hkv, group, D]), all at one
            # position. SDPA's fused GPU kernels take that with a mask, where enable_gqa with a mask
            # falls back to its math kernel, which copies the cache once per query head of a group.
            out = F.scaled_dot_product_attention(
                xq.reshape(bsz, self.n_kv_heads, group, self.head_dim), keys, values, attn_mask=mask
            )
            return out.reshape(bsz, self.n_heads, 1, self.head_dim)
        return F.scaled_dot_product_attention(
            xq,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and xq.shape[2] > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(f"vocab_size is {params.vocab_size}: set it from the tokenizer before building the model")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        # Left uninitialized, as Meta's ParallelEmbedding is (init_weights() or a checkpoint fills
        # it): nn.Embedding's own normal_ on the meta device would import torch's compiler, which takes seconds.
        self.tok_embeddings = nn.Embedding(
            params.vocab_size, params.dim, _weight=torch.empty(params.vocab_size, params.dim)
        )
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.freqs_cis: torch.Tensor | None = None  # [max_seq_len, D/2], set by setup_cache
        self.max_batch_size = self.max_seq_len = 0

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache once, in the model's dtype on its device, and the rotations. Not
        inference tensors even inside torch.inference_mode: calls outside it write the cache too."""
        weight = self.tok_embeddings.weight  # never quantized: the dtype activations have
        with torch.inference_mode(False):
            for layer in self.layers:
                attention = layer.attention  # its own kv heads: a tensor-parallel rank holds some
                shape = (max_batch_size, attention.n_kv_heads, max_seq_len, attention.head_dim)
                attention.cache_k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
                attention.cache_v = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            self.freqs_cis = self._freqs(max_seq_len).to(weight.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def _apply(self, fn, recurse: bool = True):
        """.to(), .half(), .cuda() and the like move the weights; the cache, which is not a
        parameter, is then allocated again in their new dtype and place (empty: between generations)."""
        super()._apply(fn, recurse)
        if self.freqs_cis is not None:
            self.setup_cache(self.max_batch_size, self.max_seq_len)
        return self

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights for a model built without a checkpoint: N(0, 0.02) matrices, unit norms."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)

    def _freqs(self, end: int) -> torch.Tensor:
        p = self.params
        return precompute_freqs_cis(p.head_dim, end, p.rope_theta, p.use_scaled_rope, p.rope_factor)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for tokens [B, T] at positions start_pos..start_pos+T-1.

        With a cache, the tokens' keys and values are written to it and attend to everything
        before them; without one, only start_pos == 0 makes sense (the tokens see each other).
        """
        return self.output(self.hidden(tokens, start_pos)).float()

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """The final-norm hidden states [B, T, dim] that `output` turns into logits (generation
        projects only the last position: a long prompt's other logits are never read)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            what = (
                f"a {tuple(tokens.shape)} {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens)
            )
            raise ValueError(f"tokens is {what}: pass ids as a [batch, time] integer tensor ([ids] for one row)")
        if not is_int(start_pos) or start_pos < 0:
            raise ValueError(f"start_pos={start_pos!r}: the position of the first token, a whole number from 0")
        bsz, seqlen = tokens.shape
        if self.freqs_cis is None:
            if start_pos != 0:
                raise ValueError(f"start_pos={start_pos} needs a KV cache: call setup_cache() first")
            freqs_cis = self._freqs(seqlen).to(tokens.device)
        else:
            if bsz > self.max_batch_size or start_pos + seqlen > self.max_seq_len:
                raise ValueError(
                    f"tokens [{bsz}, {seqlen}] at start_pos={start_pos} do not fit the cache "
                    f"[max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}]"
                )
            freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]

        h = self.tok_embeddings(tokens)
        mask = None  # one new token, or a prompt from position 0: SDPA's own causal mask
        if seqlen > 1 and start_pos > 0:
            # Causal among the new tokens; every cached position before start_pos is visible.
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.norm(h)
