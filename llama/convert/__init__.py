"""Converters between Meta's checkpoint layout and other formats (Hugging Face, GGUF, llama2.c, and
this project's quantized folders), each a module with a command line run by run_cli."""

import logging
import sys
from collections.abc import Callable


def run_cli(commands: Callable | dict[str, Callable]) -> None:
    """A converter's command line (fire): bad input ends with its message, not a traceback."""
    import fire

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        fire.Fire(commands)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
