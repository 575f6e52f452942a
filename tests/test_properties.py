"""Property-based tests (hypothesis): the tokenizers' round trips and the streaming decoder on random
text and random ids, the sampler on any logits and options, and params.json's one check on any
values. Each property is the invariant the module promises, checked on examples nobody chose."""

import math

import pytest
import torch
from conftest import SHARED_DATA, corpus, train_sentencepiece, train_tiktoken

from llama.model import ModelArgs
from llama.sampling import Sampler
from llama.tokenizer import StreamDecoder, Tokenizer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Any text a user can type: every code point but the surrogates, which are no characters.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


_TOKENIZERS: dict[str, Tokenizer] = {}  # built once for the module by `built`
_SPACED: dict[str, list[int]] = {}  # their ids that begin with a space


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("props")
    _TOKENIZERS["tiktoken made here"] = Tokenizer(train_tiktoken(tmp / "tiktoken.model", corpus()))
    _TOKENIZERS["SentencePiece made here"] = Tokenizer(train_sentencepiece(tmp / "sp.model", corpus(), 96))
    for name, path in (
        ("Llama 2", SHARED_DATA / "tokenizer.model"),
        ("Llama 3", SHARED_DATA / "llama3" / "tokenizer.model"),
    ):
        if path.is_file():
            _TOKENIZERS[name] = Tokenizer(path)
    yield
    _TOKENIZERS.clear()


@SETTINGS
@given(text=TEXT)
def test_byte_level_tokenizers_give_back_any_text(text):
    """tiktoken BPE is lossless on every string; so is Llama 2's SentencePiece (byte fallback,
    no normalisation) but for the leading space SentencePiece always reads as its own marker."""
    for name in ("tiktoken made here", "Llama 3"):
        if name in _TOKENIZERS:
            tok = _TOKENIZERS[name]
            assert tok.decode(tok.encode(text, bos=False, eos=False)) == text, name
    if "Llama 2" in _TOKENIZERS and not text.startswith(" "):
        tok = _TOKENIZERS["Llama 2"]
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def _spaced(tok: Tokenizer) -> list[int]:
    if hasattr(tok, "sp_model"):
        return [i for i in range(tok.n_words) if tok.sp_model.id_to_piece(i).startswith("▁")]
    return [rank for token, rank in tok.ranks.items() if token.startswith(b" ")][:5000]


@settings(SETTINGS, max_examples=400)
@given(data=st.data())
def test_streamed_text_is_always_a_prefix_of_the_final_text(data):
    """For any ids, each tokenizer: what a stream has shown is at every step a prefix of the decoded
    whole (so no U+FFFD or lost space the final text lacks), and all of it once flushed."""
    for name, tok in _TOKENIZERS.items():
        # any id, or one that begins with a space (the cases where a text's start differs from its middle)
        ids = data.draw(
            st.lists(st.one_of(st.integers(0, tok.n_words - 1), st.sampled_from(_spaced(tok))), max_size=16)
        )
        final, stream, shown = tok.decode(ids), StreamDecoder(tok), ""
        for token in ids:
            shown += stream.push(token)
            assert final.startswith(shown), (name, ids)
        assert shown + stream.flush() == final, (name, ids)


@SETTINGS
@given(text=TEXT)
def test_a_stream_of_encoded_text_shows_exactly_that_text(text):
    tok = _TOKENIZERS["tiktoken made here"]
    ids, stream = tok.encode(text, bos=False, eos=False), StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


LOGITS = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=2, max_size=40)


@SETTINGS
@given(
    rows=st.lists(LOGITS, min_size=1, max_size=3).filter(lambda rows: len({len(r) for r in rows}) == 1),
    temperature=st.one_of(st.just(0.0), st.floats(1e-3, 10)),
    top_p=st.floats(1e-3, 1.0),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
    penalty=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**31),
)
def test_the_sampler_picks_a_valid_index_for_any_logits_and_options(rows, temperature, top_p, top_k, penalty, seed):
    logits = torch.tensor(rows)
    history = torch.randint(-1, logits.shape[1], (logits.shape[0], 5), generator=torch.Generator().manual_seed(seed))
    sampler = Sampler(temperature, top_p, top_k, penalty)
    token = sampler(logits, history, torch.Generator().manual_seed(seed))
    assert token.shape == (logits.shape[0],) and token.dtype == torch.long
    assert ((token >= 0) & (token < logits.shape[1])).all()
    if temperature == 0 and penalty == 1.0:
        assert torch.equal(token, logits.argmax(dim=-1))


ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
)
FIELDS = [
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "rope_scaling_factor",
]


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=6))
def test_params_json_is_refused_with_a_value_error_or_is_a_llama(params):
    """Any values: either a ValueError naming a field, or arguments every size of the model can use."""
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 96}
    try:
        args = ModelArgs.from_params(base | params)
    except ValueError as e:
        assert any(name in str(e) for name in FIELDS), e
        return
    assert args.head_dim * args.n_heads == args.dim and args.head_dim % 2 == 0
    assert args.n_heads % args.kv_heads == 0 and args.ffn_hidden_dim > 0 and args.parameter_count() > 0
    assert isinstance(args.use_scaled_rope, bool) and 0 < args.norm_eps < math.inf and 0 < args.rope_factor < math.inf
