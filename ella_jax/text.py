"""Tokenization for the text models (T5 or a decoder-only LLM for ELLA, CLIP for Stable
Diffusion).

Tokenizers are transformers' (the only run-time use of transformers), read from local files
(a bucket's are downloaded first).
"""

import os

import numpy as np

from ella_jax import storage
from ella_jax.weights.tensors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
MORE_TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "added_tokens.json", "config.json")


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in `folder` (tokenizer.json, or vocab.json + merges.txt, or
    spiece.model), never from the network."""
    # Without torch, importing transformers warns that its models are unavailable: this project
    # wants its tokenizers only, and never torch at run time.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    folder = storage.path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        with storage.local_copy(folder, TOKENIZER_FILES + MORE_TOKENIZER_FILES) as local:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(local), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({e})") from None
    # Decoder-only LLMs' tokenizers often have no padding token (Llama, Mistral) or pad on the
    # left: the models here read right-padded batches, the padding masked.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize(
    tokenizer, prompts: list[str], max_length: int | None, pad_to_multiple_of: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 (B, L), mask bool (B, L), True for real tokens).

    max_length set: padded and truncated to exactly max_length (end token kept), ELLA's fixed
    token length and CLIP's 77. None: every prompt keeps all its tokens (ELLA's flexible token
    length), padded to the longest rounded up to `pad_to_multiple_of`, so few shapes compile.
    """
    if max_length is not None:
        encoded = tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True
        )
    else:
        encoded = tokenizer(list(prompts), padding=True, pad_to_multiple_of=pad_to_multiple_of)
    ids = np.asarray(encoded["input_ids"], np.int32)
    mask = np.asarray(encoded["attention_mask"], bool)
    return ids, mask
