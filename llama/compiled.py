"""A decode step whose shapes never change, so that torch.compile can capture it once (gpt-fast's
way): each row's position is a tensor, the new keys and values are written into the static KV
cache at those positions, and attention reads the whole cache under a mask of the positions each
row has written. With mode="reduce-overhead" on CUDA the step replays as one CUDA graph. It serves
Meta's schedule (every row at one position) and continuous batching (each row at its own, the batch
padded to the cache's rows). Layout: B batch, S cache positions, H heads, D head dim; the
counterpart of llama.model's Attention.forward for T = 1 and of llama.batching's decode_rows.
"""

import time

import torch

from llama.model import Transformer


class StaticDecode:
    """step(tokens [B, 1], start_pos) -> float32 logits [B, vocab], the last position's logits of
    model(tokens, start_pos), computed over max_seq_len cache positions whatever start_pos is;
    step.rows(tokens [B, 1], positions [B]) -> decode_rows' logits, row b at positions[b]."""

    def __init__(self, model: Transformer, mode: str | None = "reduce-overhead"):
        if model.freqs_cis is None:
            raise ValueError("StaticDecode needs the model's KV cache: call model.setup_cache() first")
        self.model = model
        self.freqs_cis: torch.Tensor | None = None  # the cache's rotations, of which cos and sin are the parts
        self.cos = self.sin = self.positions = self.pos = self.tokens = None
        self.mode = mode
        self.compiled = self.eager if mode is None else torch.compile(self.eager, mode=mode, dynamic=False)
        self.warmup_s: float | None = None  # the first call's seconds: compiling (capture follows in the next calls)
        self.calls = 0

    def __getstate__(self) -> dict:
        """copy and pickle: the model and mode; the compiled function (bound to this object's model)
        and the step's tensors are made again for the copy."""
        return {"model": self.model, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["mode"])

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if tokens.shape[1] != 1 or start_pos >= self.model.max_seq_len:
            raise ValueError(
                f"a decode step takes one new token per row inside the cache, not {tuple(tokens.shape)} at "
                f"start_pos={start_pos} (max_seq_len={self.model.max_seq_len})"
            )
        self._follow_cache()
        bsz = tokens.shape[0]
        self.pos[:bsz].fill_(start_pos)  # a device-side write: no host synchronisation
        return self._run(tokens, self.pos[:bsz])

    def rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Continuous batching's step: tokens [n, 1] of the cache's rows 0..n-1, row b's at
        positions[b] (on the device). Run over all max_batch_size rows, so that one graph serves
        every n: the rows past n compute on their free slots, whose contents no row reads before
        a prompt's prefill writes them again."""
        self._follow_cache()
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.pos[:n].copy_(positions)
        return self._run(self.tokens, self.pos)[:n]

    def _follow_cache(self) -> None:
        """The step's own tensors, made again on the first call and whenever setup_cache ran again.
        Marked static: a CUDA graph reads them in place rather than copying them in at each replay."""
        m = self.model
        if self.freqs_cis is m.freqs_cis:
            return
        self.freqs_cis, device = m.freqs_cis, m.freqs_cis.device
        with torch.inference_mode(False):  # written in place by calls inside inference mode (Meta's loop) and out
            self.cos, self.sin = self.freqs_cis.real.contiguous(), self.freqs_cis.imag.contiguous()
            self.positions = torch.arange(m.max_seq_len, device=device)
            self.pos = torch.zeros(m.max_batch_size, dtype=torch.long, device=device)
            self.tokens = torch.zeros(m.max_batch_size, 1, dtype=torch.long, device=device)
        if self.mode is not None:
            for t in (self.cos, self.sin, self.positions, self.pos, self.tokens):
                torch._dynamo.mark_static_address(t)

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.calls:
            self.calls += 1
            return self.compiled(tokens, pos).clone()  # a graph's output is overwritten by its next replay
        t = time.perf_counter()
        logits = self.compiled(tokens, pos).clone()
        logits.sum().item()  # wait for the compilation's first run to finish
        self.warmup_s, self.calls = time.perf_counter() - t, 1
        return logits

    def eager(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The step: row b's token at position pos[b]. Rotations are freqs_cis's parts, cos and sin
        (inductor leaves complex numbers to eager kernels)."""
        m = self.model
        bsz = tokens.shape[0]
        rows = torch.arange(bsz, device=tokens.device)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D/2]
        visible = (self.positions[None, :] <= pos[:, None])[:, None, None]  # [B, 1, 1, S]: up to and including pos
        h = m.tok_embeddings(tokens)
        for layer in m.layers:
            a = layer.attention
            xq, xk, xv = a.project(layer.attention_norm(h))
            xq, xk = rotate(xq, cos, sin), rotate(xk, cos, sin)
            keys, values = a.cache_k[:bsz], a.cache_v[:bsz]  # [B, Hkv, S, D]
            keys[rows, :, pos] = xk[:, 0]
            values[rows, :, pos] = xv[:, 0]
            out = a.attend(xq.transpose(1, 2), keys, values, visible)
            h = h + a.wo(out.transpose(1, 2).reshape(bsz, 1, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)[:, -1]).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb's complex product (x0 + i x1)(cos + i sin) in real float32 arithmetic."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, 1, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)
