"""The loaders, called directly as a notebook would: one per source, each returning (model, tokenizer)."""

import pytest
import torch
from conftest import GQA, LLAMA3, random_state_dict

from llama.convert.gguf import write_gguf
from llama.loading import load, load_meta_folder, load_quantized_folder, random_weights, run_dtype, uses_tiktoken
from llama.model import ModelArgs, Transformer
from llama.quantize import save_quantized
from llama.tokenizer import Tokenizer


def test_each_source_gives_a_model_and_its_tokenizer_without_a_cache(make_ckpt, tmp_path):
    folder, sd = make_ckpt(GQA, 2)
    model, tokenizer = load_meta_folder(folder, device="cpu", dtype="float32")
    assert isinstance(model, Transformer) and isinstance(tokenizer, Tokenizer)
    assert model.freqs_cis is None and model.layers[0].attention.cache_k is None  # the run's, not the loader's
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()

    int8 = load_meta_folder(folder, device="cpu", dtype="bf16", quantize="int8")[0]
    saved = save_quantized(int8, tmp_path / "q", folder / "tokenizer.model")
    quantized, _ = load_quantized_folder(saved, device="cpu", dtype="bfloat16")
    assert quantized.quantization == {"scheme": "int8", "group_size": None}
    assert all(torch.equal(quantized.state_dict()[k], v) for k, v in int8.state_dict().items())
    assert load(saved, device="cpu", dtype="bf16")[0].quantization == quantized.quantization  # picked by its files

    random, tok = random_weights(folder, device=torch.device("cpu"), dtype=torch.float32, seed=3)
    assert tok.path == folder / "tokenizer.model" and not torch.equal(random.output.weight, model.output.weight)
    assert torch.equal(
        random.output.weight, random_weights(folder, device="cpu", dtype="fp32", seed=3)[0].output.weight
    )


def test_a_quantized_folder_is_not_quantized_twice(make_ckpt, tmp_path):
    folder, _ = make_ckpt(GQA, 1)
    saved = save_quantized(load_meta_folder(folder, device="cpu", dtype="bf16", quantize="int8")[0], tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized .int8.: leave out quantize="):
        load_quantized_folder(saved, folder / "tokenizer.model", device="cpu", dtype="bf16", quantize="int4")
    with pytest.raises(FileNotFoundError, match="no quantization.json in"):
        load_quantized_folder(folder, device="cpu")
    # what torchrun's processes open as a Meta folder: its uint8 weights were said not to be floats
    with pytest.raises(ValueError, match=r"is a quantized folder \(quantization.json\).* in one process"):
        load_meta_folder(saved, device="cpu")


def test_the_default_dtype_follows_the_family_by_its_tokenizer(make_ckpt, tiktoken_path, sp_model_path, tmp_path):
    """Meta's Llama 3 code runs in bf16 on GPUs that have it, its Llama 2 code in fp16: the family is
    told by the tokenizer a build would use, its first line read (the CUDA choice: test_devices)."""
    llama3, _ = make_ckpt(LLAMA3, 1, name="llama3", tokenizer=tiktoken_path)
    llama2, _ = make_ckpt(GQA, 1, name="llama2")
    assert uses_tiktoken(llama3) and not uses_tiktoken(llama2)
    assert uses_tiktoken(llama2, tiktoken_path) and not uses_tiktoken(llama3, sp_model_path)  # the one given wins
    assert not uses_tiktoken("llama-3.1-8b")  # a preset alone has no tokenizer
    for name, folder in (("llama3", llama3), ("llama2", llama2)):
        tokenizer = Tokenizer(folder / "tokenizer.model")
        params = dict(LLAMA3 if name == "llama3" else GQA, vocab_size=tokenizer.n_words)
        path = write_gguf(random_state_dict(params), ModelArgs(**params), tokenizer, tmp_path / f"{name}.gguf", "F16")
        assert uses_tiktoken(path) is (name == "llama3")  # the file's own vocabulary: "gpt2" or "llama"
    assert run_dtype(llama3, None, None, "cpu") == torch.bfloat16 == run_dtype(llama2, None, None, "cpu")
    assert run_dtype(llama3, None, "fp16", "cpu") == torch.float16  # asked for
