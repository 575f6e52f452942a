"""A decode step whose shapes never change, so that torch.compile can capture it once (gpt-fast's
way): the position is a tensor, the new keys and values are written into the static KV cache with
index_copy_, and attention reads the whole cache under a mask of the positions written so far.
With mode="reduce-overhead" on CUDA the step replays as one CUDA graph. Layout: B batch, S cache
positions, H heads, D head dim; the counterpart of llama.model's Attention.forward for T = 1.
"""

import time

import torch
import torch.nn.functional as F

from llama.model import Transformer


class StaticDecode:
    """step(tokens [B, 1], start_pos) -> float32 logits [B, vocab], the last position's logits of
    model(tokens, start_pos), computed over max_seq_len cache positions whatever start_pos is."""

    def __init__(self, model: Transformer, mode: str | None = "reduce-overhead"):
        if model.freqs_cis is None:
            raise ValueError("StaticDecode needs the model's KV cache: call model.setup_cache() first")
        self.model = model
        device = model.freqs_cis.device
        self.freqs_cis: torch.Tensor | None = None  # the cache's rotations, of which cos and sin are the parts
        self.cos = self.sin = self.positions = None
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # one buffer: a graph reads it in place
        self.mode = mode
        self.compiled = self.eager if mode is None else torch.compile(self.eager, mode=mode, dynamic=False)
        self.warmup_s: float | None = None  # the first call's seconds: compiling (capture follows in the next calls)
        self.calls = 0

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if tokens.shape[1] != 1 or start_pos >= self.model.max_seq_len:
            raise ValueError(
                f"a decode step takes one new token per row inside the cache, not {tuple(tokens.shape)} at "
                f"start_pos={start_pos} (max_seq_len={self.model.max_seq_len})"
            )
        if self.freqs_cis is not self.model.freqs_cis:  # the first call, or setup_cache ran again
            self.freqs_cis = self.model.freqs_cis
            self.cos, self.sin = self.freqs_cis.real.contiguous(), self.freqs_cis.imag.contiguous()
            self.positions = torch.arange(self.model.max_seq_len, device=self.pos.device)
        self.pos.fill_(start_pos)  # a device-side write: no host synchronisation
        args = (tokens, self.pos, self.cos[start_pos : start_pos + 1], self.sin[start_pos : start_pos + 1])
        if self.calls:
            self.calls += 1
            return self.compiled(*args).clone()  # a graph's output is overwritten by its next replay
        t = time.perf_counter()
        logits = self.compiled(*args).clone()
        logits.sum().item()  # wait for the compilation's first run to finish
        self.warmup_s, self.calls = time.perf_counter() - t, 1
        return logits

    def eager(self, tokens: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The step; cos and sin [1, D/2] are the rotation at pos (freqs_cis's parts: inductor
        leaves complex numbers to eager kernels)."""
        m = self.model
        bsz = tokens.shape[0]
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, D/2], broadcast over B and H
        visible = (self.positions <= pos)[None]  # [1, S]: the cache up to and including this token
        h = m.tok_embeddings(tokens)
        for layer in m.layers:
            a = layer.attention
            xq, xk, xv = a.project(layer.attention_norm(h))
            xq, xk = rotate(xq, cos, sin), rotate(xk, cos, sin)
            keys, values = a.cache_k[:bsz], a.cache_v[:bsz]  # [B, Hkv, S, D]
            keys.index_copy_(2, pos, xk.transpose(1, 2))
            values.index_copy_(2, pos, xv.transpose(1, 2))
            out = F.scaled_dot_product_attention(
                xq.transpose(1, 2), keys, values, attn_mask=visible, enable_gqa=a.n_kv_heads != a.n_heads
            )
            h = h + a.wo(out.transpose(1, 2).reshape(bsz, 1, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)[:, -1]).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb's complex product (x0 + i x1)(cos + i sin) in real float32 arithmetic."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, 1, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)
