"""LLaMA in Meta's checkpoint layout, on any single device: `LLaMa.build(folder).text_completion(...)`."""

from llama.batching import Completion
from llama.decoding import Completions, StreamEvent
from llama.generation import LLaMa
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Completion", "Completions", "LLaMa", "ModelArgs", "StreamEvent", "Tokenizer", "Transformer"]
