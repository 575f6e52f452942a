"""Meta's chat formats, chosen by the model's tokenizer. Llama 2 (SentencePiece; Meta's
llama/generation.py): BOS [INST] {user} [/INST] {answer} EOS per finished turn, BOS [INST] {user}
[/INST] for the last, the system prompt in <<SYS>> tags in front of the first user message.
Llama 3 (tiktoken; llama_models/llama3/chat_format.py): <|begin_of_text|>, then per message
<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>, then an open assistant header.
"""

from llama.decoding import STOP_REASONS
from llama.tokenizer import TiktokenTokenizer, Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}  # as written
PYTHON_TAG = "<|python_tag|>"  # opens a Llama 3 assistant's call of a built-in tool

Message = dict  # {"role": ..., "content": str}; a Llama 3 assistant's may add "stop_reason" (a reply's)
Dialog = list[Message]


def is_llama3(tokenizer: Tokenizer | None) -> bool:
    return isinstance(tokenizer, TiktokenTokenizer)


def check_dialog(dialog: Dialog, index: int = 0, tokenizer: Tokenizer | None = None) -> None:
    """Llama 2: an optional system message, then user and assistant alternating, ending with the
    user's. Llama 3: any of system (first only), user, assistant and tool messages."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog {index} is empty or not a list of messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or not isinstance(msg.get("role"), str):
            raise ValueError(f'dialog {index}, message {i}: expected {{"role": ..., "content": str}}, got {msg!r}')
    if is_llama3(tokenizer):
        for i, msg in enumerate(dialog):
            if msg["role"] not in LLAMA3_ROLES or (msg["role"] == "system" and i > 0):
                raise ValueError(
                    f"dialog {index}, message {i}: role {msg['role']!r}; Llama 3 dialogs take an optional system "
                    "message first, then user, assistant and tool messages"
                )
            if msg.get("stop_reason", "end_of_turn") not in STOP_REASONS:
                raise ValueError(
                    f"dialog {index}, message {i}: stop_reason {msg['stop_reason']!r}: use one of {STOP_REASONS}"
                )
        return
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


def has_special_tags(dialog: Dialog, tokenizer: Tokenizer | None = None) -> bool:
    """Whether a Llama 2 dialog spells the format's tags (Meta refuses those). Llama 3's special
    tokens are never produced from text, so its dialogs have none."""
    return not is_llama3(tokenizer) and any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt ids of a (checked) dialog, in the format of the tokenizer's models."""
    return _encode_llama3(tokenizer, dialog) if is_llama3(tokenizer) else _encode_llama2(tokenizer, dialog)


def _encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Each finished turn encoded on its own, as Meta's code does."""
    if dialog[0]["role"] == "system":
        first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        turn = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(turn, bos=True, eos=True)
    return tokens + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)


def _encode_llama3(tokenizer: TiktokenTokenizer, dialog: Dialog) -> list[int]:
    """Header, content and end id of each message (content as it is, unstripped, as Meta's
    llama_models does), then the header the model answers after. An assistant message that calls a
    tool, as the model wrote it (its text starting with <|python_tag|>), gets that special id back."""
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        tokens += _llama3_header(tokenizer, LLAMA3_ROLES[msg["role"]])
        content = msg["content"]
        if msg["role"] == "assistant" and content.startswith(PYTHON_TAG):
            tokens.append(tokenizer.special_tokens[PYTHON_TAG])
            content = content.removeprefix(PYTHON_TAG)
        tokens += tokenizer.encode(content, bos=False, eos=False)
        eom = msg["role"] == "assistant" and msg.get("stop_reason") == "end_of_message"
        tokens.append(tokenizer.eom_id if eom else tokenizer.eot_id)
    return tokens + _llama3_header(tokenizer, "assistant")


def _llama3_header(tokenizer: TiktokenTokenizer, role: str) -> list[int]:
    start, end = tokenizer.special_tokens["<|start_header_id|>"], tokenizer.special_tokens["<|end_header_id|>"]
    return [start, *tokenizer.encode(role, bos=False, eos=False), end, *tokenizer.encode("\n\n", bos=False, eos=False)]
