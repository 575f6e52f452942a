"""Llama 2's chat format, exactly as Meta's llama/generation.py lays it out:
BOS [INST] {user} [/INST] {answer} EOS per finished turn, BOS [INST] {user} [/INST] for the last,
and the system prompt wrapped in <<SYS>> tags in front of the first user message.
"""

from llama.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Dialog = list[Message]


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Optional system message, then user/assistant alternating, ending with user."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog {index} is empty or not a list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise ValueError(f'dialog {index}, message {i}: expected {{"role": ..., "content": str}}, got {msg!r}')
    start = 1 if dialog[0]["role"] == "system" else 0
    for i, msg in enumerate(dialog[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ValueError(
                f"dialog {index}, message {i}: expected role {expected!r}, got {msg['role']!r} "
                "(an optional system message first, then user and assistant alternating)"
            )
    if dialog[-1]["role"] != "user":
        raise ValueError(f"dialog {index} ends with {dialog[-1]['role']!r}: the last message must be the user's")


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt ids of a (checked) dialog, each finished turn encoded on its own."""
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        turn = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(turn, bos=True, eos=True)
    return tokens + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
