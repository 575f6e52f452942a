"""One peer, one process (run by bench/speed.py and bench/device_check.py): load the model, warm
up, time each workload and print a JSON line of tokens/s, load seconds, warm-up seconds and peak
memory (resident, or the GPU's allocator on CUDA). Greedy decoding throughout; prompts are the same
random ids for every peer. Decode runs once per round; a prefill, being short, three times (median);
many_N (ours alone) is complete_many over N prompts of mixed lengths, new ids per second; profile_bN
(ours and transformers) is what one decode step at batch N launches (`step_profile`).

    python bench/peers.py ours|hf|llamacpp[-VARIANT] PATH decode_b1,prefill_512,... NEW_TOKENS THREADS [DEVICE]

Variants: ours-fp16|bf16|fp32 (the dtype), ours-int8|int4 (quantized linears), ours-packed (oneDNN
layout), ours-fp16-compiled (CUDA graphs), hf-fp16|bf16; llamacpp-q8_0 and the like name the file.
"""

import json
import os
import statistics
import sys
import time

import numpy as np

PROMPT_LEN, PREFILL_LEN = 32, 512


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def prompts(batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(batch * 1000 + length)
    return rng.integers(3, 32000, size=(batch, length)).tolist()


def workload(name: str) -> tuple[int, int, bool]:
    """(batch, prompt length, is prefill) of a workload name like decode_b8 or prefill_512; many_N
    (complete_many over N prompts, ours alone) is MANY_ROWS rows at a time, prompts up to MANY_LEN."""
    kind, arg = name.split("_")
    if kind == "many":
        return MANY_ROWS, MANY_LEN, False
    return (1, int(arg), True) if kind == "prefill" else (int(arg[1:]), PROMPT_LEN, False)  # decode, profile


MANY_ROWS, MANY_LEN = 32, 256
# Decode steps before timing: a compiled step is compiled at the first, run once more, then captured
# as a CUDA graph (torch's cudagraph trees), so that the timed steps replay it.
WARM_STEPS = 3


def many_prompts(n: int, new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """n prompts of 16..MANY_LEN random ids and their max_gen_len, new_tokens / 4..new_tokens:
    the batch completion script's mixed lengths."""
    rng = np.random.default_rng(n)
    prompts = [rng.integers(3, 32000, size=k).tolist() for k in rng.integers(16, MANY_LEN + 1, size=n)]
    budgets = rng.integers(max(1, new_tokens // 4), new_tokens + 1, size=n).tolist()
    return prompts, budgets


PROFILED_STEPS = 8  # a 7B step launches about a thousand kernels: the profiler takes seconds to read them


def step_profile(generate, ids: list[list[int]], cuda: bool) -> dict:
    """What one decode step launches, under torch's profiler: the difference of two greedy generate
    calls PROFILED_STEPS steps apart, per step. aten_ops counts the operators Python calls (nested
    ones not again); on CUDA, kernels counts what ran on the card (copies included) and kernel_ms
    their summed time: against the unprofiled step's milliseconds it says whether the card or the
    host sets the pace. The kernels that took longest are named."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def tally(steps: int) -> tuple[int, int, Counter]:
        with profile(activities=activities) as prof:
            produced = generate(ids, steps)
        assert produced == len(ids) * steps, (steps, produced)  # a row stopped early: the difference is not steps
        ops = kernels = 0
        kernel_us = Counter()
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kernels += 1
                kernel_us[e.name] += e.time_range.elapsed_us()
            elif e.cpu_parent is None and e.name.startswith("aten::"):
                ops += 1
        return ops, kernels, kernel_us

    short, long = tally(WARM_STEPS + 1), tally(WARM_STEPS + 1 + PROFILED_STEPS)
    per_step = [(b - a) / PROFILED_STEPS for a, b in zip(short[:2], long[:2])]
    kernel_us = long[2]
    kernel_us.subtract(short[2])
    top = [(name, us / 1e3 / PROFILED_STEPS) for name, us in kernel_us.most_common(6) if us > 0]
    return {
        "aten_ops": per_step[0],
        "kernels": per_step[1],
        "kernel_ms": sum(kernel_us.values()) / 1e3 / PROFILED_STEPS,
        "top_kernels_ms": top,
    }


DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class Ours:
    def __init__(self, path: str, threads: int, max_batch: int, max_len: int, device: str, variant: str = ""):
        import torch

        from llama import LLaMa
        from llama.cpu import weight_bytes

        torch.set_num_threads(threads)
        parts = variant.split("-")
        # the device's default dtype (bf16 on the CPU, fp16 on CUDA) unless a variant names one
        dtype = next((DTYPES[p] for p in parts if p in DTYPES), None)
        quantize = next((p for p in parts if p in ("int8", "int4")), None)
        self.llm = LLaMa.build(
            path,
            max_seq_len=max_len,
            max_batch_size=max_batch,
            device=device,
            dtype=dtype,
            quantize=quantize,
            pack="packed" in parts,
            compile="compiled" in parts,
        )
        self.weight_bytes = weight_bytes(self.llm.model)  # state_dict() would unpack packed weights
        attentions = [layer.attention for layer in self.llm.model.layers]
        self.cache_bytes = sum(a.cache_k.nbytes + a.cache_v.nbytes for a in attentions)  # allocated by build

    def generate(self, batch: list[list[int]], new_tokens: int) -> int:
        tokens, _ = self.llm.generate(batch, new_tokens, temperature=0)
        return sum(map(len, tokens))

    def many(self, prompts: list[list[int]], max_gen_len: list[int]) -> int:
        """complete_many's new ids (rows may end early at a stop id)."""
        return sum(len(c.tokens) for c in self.llm.complete_many(prompts, 0.0, max_gen_len=max_gen_len))


class HF:
    def __init__(self, path: str, threads: int, max_batch: int, max_len: int, device: str, variant: str = ""):
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        dtype = getattr(torch, DTYPES[variant or "bf16"])
        on = {} if device == "cpu" else {"device_map": device}  # where accelerate loads it straight to the GPU
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, **on).eval()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def generate(self, batch: list[list[int]], new_tokens: int) -> int:
        ids = self.torch.tensor(batch, device=self.device)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=self.torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: one sequence per prompt in a shared
    KV cache, one llama_decode per step for the whole batch, greedy argmax on its logits."""

    def __init__(self, path: str, threads: int, max_batch: int, max_len: int, device: str, variant: str = ""):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max_batch * max_len
        cparams.n_batch = cparams.n_ubatch = PREFILL_LEN
        cparams.n_seq_max = max_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(PREFILL_LEN, 0, max_batch)
        self.weight_bytes = os.path.getsize(path)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits), at most n_batch of them."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, batch: list[list[int]], new_tokens: int) -> int:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        last = []
        for seq, prompt in enumerate(batch):  # each prompt's tokens in one pass, as our prefill does
            self._decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            last.append(self._argmax(len(prompt) - 1))
        for step in range(1, new_tokens):
            self._decode([(tok, len(batch[s]) + step - 1, s, True) for s, tok in enumerate(last)])
            last = [self._argmax(i) for i in range(len(batch))]
        return len(batch) * new_tokens


def main() -> None:
    peer, path, names, new_tokens, threads, device = (sys.argv[1:] + ["cpu"])[:6]
    peer, _, variant = peer.partition("-")  # ours-int8: quantized here; llamacpp-q8_0: the file's type
    names, new_tokens, threads = names.split(","), int(new_tokens), int(threads)
    specs = {n: workload(n) for n in names}
    max_batch = max(b for b, _, _ in specs.values())
    steps = {n: WARM_STEPS + 1 + PROFILED_STEPS if n.startswith("profile") else new_tokens for n in names}
    max_len = max(length + (1 if pre else steps[n]) for n, (_, length, pre) in specs.items())
    # Import the peer's libraries first: peak memory counts what loading the model adds.
    __import__({"ours": "llama", "hf": "transformers.models.llama", "llamacpp": "llama_cpp"}[peer])
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.init()  # the context's own memory and seconds are not the model's
    base = status("VmRSS")
    t = time.perf_counter()
    model = {"ours": Ours, "hf": HF, "llamacpp": LlamaCpp}[peer](path, threads, max_batch, max_len, device, variant)
    result = {"load_s": time.perf_counter() - t, "weight_bytes": model.weight_bytes}
    if hasattr(model, "cache_bytes"):  # ours: the KV cache for the largest workload, in the peak from the start
        result["cache_bytes"] = model.cache_bytes
    for name, (batch, length, prefill) in specs.items():
        if name.startswith("many"):
            many, budgets = many_prompts(int(name.split("_")[1]), new_tokens)
            t = time.perf_counter()
            model.many(many[:2], [WARM_STEPS + 1] * 2)  # warm-up (a compiled step compiles at all rows)
            result[f"{name}_warmup_s"] = time.perf_counter() - t
            t = time.perf_counter()
            produced = model.many(many, budgets)
            result[name] = produced / (time.perf_counter() - t)
            continue
        ids, n = prompts(batch, length), 1 if prefill else new_tokens
        if name.startswith("profile"):
            model.generate(ids, WARM_STEPS + 1)  # warm-up, as decode's
            result[name] = step_profile(model.generate, ids, cuda)
            continue
        t = time.perf_counter()
        model.generate(ids, 2 if prefill else WARM_STEPS + 1)  # warm-up at this shape (where a compiled step compiles)
        result[f"{name}_warmup_s"] = time.perf_counter() - t
        times = []
        for _ in range(3 if prefill else 1):  # a prefill takes well under a second: median of three
            t = time.perf_counter()
            produced = model.generate(ids, n)
            times.append(time.perf_counter() - t)
            assert produced == batch * n, (name, produced)
        result[name] = (length if prefill else produced) / statistics.median(times)
    result["peak_rss_bytes"] = status("VmHWM") - base
    if cuda:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
