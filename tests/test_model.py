"""The network: invariants of the cache and RoPE, and logits equal to Hugging Face's LlamaForCausalLM."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import GQA, MHA, THETA, random_state_dict, tokens

from llama.model import ModelArgs, Transformer, precompute_freqs_cis

PRESETS = Path(__file__).resolve().parents[1] / "params"


def build(params: dict, seed: int = 0) -> Transformer:
    model = Transformer(ModelArgs.from_params(params))
    model.load_state_dict(random_state_dict(params, seed), strict=True)
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize("params", [MHA, GQA, THETA], ids=["mha", "gqa", "theta1e6"])
def test_cached_decode_and_chunked_prefill_equal_one_full_forward(params):
    model = build(params)
    x = tokens(params["vocab_size"], 2, 12)
    full = model(x, 0)  # no cache: the tokens attend to each other causally
    model.setup_cache(max_batch_size=3, max_seq_len=16)
    steps = torch.cat([model(x[:, i : i + 1], i) for i in range(12)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    chunks = torch.cat([model(x[:, :5], 0), model(x[:, 5:9], 5), model(x[:, 9:], 9)], dim=1)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)
    assert full.dtype == torch.float32 and full.shape == (2, 12, params["vocab_size"])


def test_forward_is_causal():
    model = build(GQA)
    x = tokens(GQA["vocab_size"], 1, 10)
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 1) % GQA["vocab_size"]
    torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6])
    assert not torch.allclose(model(x)[:, 6:], model(y)[:, 6:])


def test_forward_outside_cache_is_a_clear_error():
    model = build(MHA)
    with pytest.raises(ValueError, match="setup_cache"):
        model(tokens(MHA["vocab_size"], 1, 2), 3)
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(tokens(MHA["vocab_size"], 1, 4), 6)
    with pytest.raises(ValueError, match="start_pos=-1: the position of the first token"):
        model(tokens(MHA["vocab_size"], 1, 4), -1)
    for bad, what in (([[1, 2]], "<class 'list'>"), (torch.tensor([1, 2]), r"a \(2,\) torch.int64 tensor")):
        with pytest.raises(ValueError, match=f"tokens is {what}: pass ids as a \\[batch, time\\] integer tensor"):
            model(bad, 0)


def test_moving_or_casting_the_model_takes_its_cache_along():
    """.to() moves parameters only; the cache (attributes) is made again in the new dtype, where it
    had stayed behind and attention refused the mixed dtypes."""
    a = build(MHA)
    b = copy.deepcopy(a)
    a.setup_cache(2, 16)
    a.to(torch.bfloat16)
    b.to(torch.bfloat16).setup_cache(2, 16)
    assert a.layers[0].attention.cache_v.dtype == torch.bfloat16 and a.freqs_cis.dtype == torch.complex64
    x = tokens(MHA["vocab_size"], 2, 5)
    assert torch.equal(a(x, 0), b(x, 0)) and torch.equal(a(x[:, :1], 5), b(x[:, :1], 5))


def test_a_cache_made_inside_inference_mode_is_written_outside_it():
    model = build(MHA)
    with torch.inference_mode():
        model.setup_cache(1, 8)
    with torch.no_grad():
        assert model(tokens(MHA["vocab_size"], 1, 3), 0).shape == (1, 3, MHA["vocab_size"])


def test_rope_rotates_interleaved_pairs_by_position_times_frequency():
    freqs = precompute_freqs_cis(8, 5, theta=10000.0)
    pos, i = 3, 2  # pair i turns by pos * theta^(-2i/d)
    angle = pos * 10000.0 ** (-2 * i / 8)
    assert torch.allclose(freqs[pos, i], torch.polar(torch.tensor(1.0), torch.tensor(angle)), atol=1e-6)


def test_ffn_hidden_size_follows_meta_rule():
    # 7B: 4096 -> 11008; Llama 3 8B: multiplier 1.3, multiple_of 1024 -> 14336; 70B -> 28672.
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008
    assert ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).ffn_hidden_dim == 14336
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672


def test_params_round_trip_keeps_unknown_keys():
    raw = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 10, "max_seq_len": 4096, "foo": [1]}
    args = ModelArgs.from_params(raw)
    assert args.extra == {"max_seq_len": 4096, "foo": [1]}
    assert ModelArgs.from_params(args.to_params()) == args


@pytest.mark.parametrize(
    "name, vocab, count",
    [
        ("llama-2-7b", 32000, 6_738_415_616),
        ("llama-2-13b", 32000, 13_015_864_320),
        ("llama-2-70b", 32000, 68_976_648_192),
        ("llama-3-8b", 128256, 8_030_261_248),
        ("llama-3.1-8b", 128256, 8_030_261_248),
        ("llama-3.1-70b", 128256, 70_553_706_496),
        ("llama-3.1-405b", 128256, 405_853_388_800),
        ("llama-3.2-1b", 128256, 1_235_814_400),  # published with the output tied to the embedding
        ("llama-3.2-3b", 128256, 3_212_749_824),
        ("llama-3.3-70b", 128256, 70_553_706_496),
    ],
)
def test_preset_parameter_counts_equal_published(name, vocab, count):
    params = json.loads((PRESETS / f"{name}.json").read_text())
    args = ModelArgs.from_params(params)
    assert args.vocab_size in (-1, vocab)
    args.vocab_size = vocab
    with torch.device("meta"):
        model = Transformer(args)
    tied = name.startswith("llama-3.2")  # Meta's folder holds output.weight all the same
    assert sum(p.numel() for p in model.parameters()) - tied * model.output.weight.numel() == count


@pytest.mark.parametrize(
    "name, factor", [("llama-3.1-8b", 8), ("llama-3.2-1b", 32), ("llama-3.2-3b", 32), ("llama-3.3-70b", 8)]
)
def test_scaled_rope_factor_is_32_for_llama_3_2_and_params_json_can_choose(name, factor):
    params = json.loads((PRESETS / f"{name}.json").read_text())
    assert "rope_scaling_factor" not in params  # Meta's params.json cannot say it
    args = ModelArgs.from_params(params)
    assert args.rope_factor == factor
    chosen = ModelArgs.from_params(dict(params, rope_scaling_factor=16.0))
    assert chosen.rope_factor == 16 and chosen.to_params()["rope_scaling_factor"] == 16
    assert "rope_scaling_factor" not in args.to_params()
    # the factor reaches the rotations: low frequencies slow by it, the highest stay
    plain = precompute_freqs_cis(args.head_dim, 2, args.rope_theta).angle()[1]
    scaled = precompute_freqs_cis(args.head_dim, 2, args.rope_theta, True, args.rope_factor).angle()[1]
    assert torch.allclose(scaled[-1], plain[-1] / factor) and scaled[0] == plain[0]


def test_every_preset_builds_on_meta_device():
    presets = sorted(PRESETS.glob("*.json"))
    assert len(presets) >= 10
    for path in presets:
        args = ModelArgs.from_params(json.loads(path.read_text()))
        assert not args.extra, f"{path.name} has keys Meta's format does not: {args.extra}"
        args.vocab_size = 32000 if args.vocab_size == -1 else args.vocab_size
        with torch.device("meta"):
            Transformer(args)


# --- an implementation nobody here wrote ---------------------------------------------------


def to_hf(sd: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face keys; wq/wk rows go from interleaved pairs to half-split RoPE order."""
    n_heads = params["n_heads"]
    kv_heads = params.get("n_kv_heads") or n_heads

    def permute(w, heads):
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(params["n_layers"]):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = permute(sd[m + "attention.wq.weight"], n_heads)
        out[h + "self_attn.k_proj.weight"] = permute(sd[m + "attention.wk.weight"], kv_heads)
        out[h + "self_attn.v_proj.weight"] = sd[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[m + "feed_forward.w1.weight"]
        out[h + "mlp.down_proj.weight"] = sd[m + "feed_forward.w2.weight"]
        out[h + "mlp.up_proj.weight"] = sd[m + "feed_forward.w3.weight"]
        out[h + "input_layernorm.weight"] = sd[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "ffn_norm.weight"]
    return out


def hf_model(sd: dict[str, torch.Tensor], params: dict):
    transformers = pytest.importorskip("transformers")
    args = ModelArgs.from_params(params)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if args.use_scaled_rope:  # Llama 3.1's scaling, as transformers names it
        config.rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(to_hf(sd, params), strict=True)
    return model.eval()


SCALED = dict(THETA, rope_theta=5e5, use_scaled_rope=True, dim=256, n_heads=2, n_kv_heads=1)


@pytest.mark.parametrize("params", [MHA, GQA, THETA, SCALED], ids=["mha", "gqa", "theta1e6", "llama3.1-rope"])
def test_logits_equal_hugging_face(params):
    sd = random_state_dict(params, seed=3)
    ours = build(params, seed=3)
    theirs = hf_model(sd, params)
    x = tokens(params["vocab_size"], 2, 20)
    with torch.no_grad():
        expected = theirs(input_ids=x).logits.float()
    torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)
    ours.setup_cache(2, 32)  # and through the cache, in two chunks
    torch.testing.assert_close(torch.cat([ours(x[:, :7], 0), ours(x[:, 7:], 7)], 1), expected, atol=1e-4, rtol=0)
