"""Host-side prompt tokenization: transformers' `CLIPTokenizer` read from a local folder, NumPy int32 out.

Why a wrapper: the jitted sampler needs fixed-shape integer token arrays (every prompt padded / truncated to
the text encoder's context length, 77 for Stable Diffusion), and the loading rules (pipeline folder with a
`tokenizer/` subfolder, a bare tokenizer folder, or a Hugging Face cache snapshot; never downloading) should
live in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_MAX_LENGTH = 77  # Stable Diffusion's CLIP context length
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # slow-style BPE files, or a `tokenizers` JSON


def _tokenizer_folder(path: str | os.PathLike, subfolder: str) -> Path:
    """`path` itself if it holds tokenizer files, else `path/subfolder` (a diffusers pipeline folder)."""
    from fusion_jax.weights import resolve_model_path  # resolves Hugging Face cache snapshots offline

    root = resolve_model_path(path)
    for folder in (root, root / subfolder):
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(
        f"no CLIP tokenizer in {root} or {root / subfolder}: expected one of {_TOKENIZER_FILES} (+ merges.txt)"
    )


class PromptTokenizer:
    """Turns prompts into (batch, max_length) int32 token ids: <bos> tokens <eos> <pad>..., truncated to fit."""

    def __init__(self, hf_tokenizer, max_length: int | None = None):
        """Wrap a loaded transformers tokenizer. `max_length` defaults to its model_max_length when that is a
        real context length, else 77."""
        if max_length is None:
            declared = getattr(hf_tokenizer, "model_max_length", None)
            max_length = declared if isinstance(declared, int) and 2 <= declared <= 4096 else DEFAULT_MAX_LENGTH
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for <bos> and <eos>), got {max_length!r}")
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, subfolder: str = "tokenizer", max_length: int | None = None
    ) -> "PromptTokenizer":
        """Load from a tokenizer folder, a pipeline folder (its `subfolder`), or a cached repo id. Offline."""
        from transformers import CLIPTokenizer

        folder = _tokenizer_folder(path, subfolder)
        return cls(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), max_length)

    @property
    def bos_token_id(self) -> int:
        return int(self.hf_tokenizer.bos_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.hf_tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf_tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (rows the text encoder's embedding must have)."""
        return len(self.hf_tokenizer)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids of shape (len(prompts), max_length), int32; a single string gives a batch of one."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [i for i, p in enumerate(batch) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; entries {bad} are {[type(batch[i]).__name__ for i in bad]}")
        if not batch:
            return np.zeros((0, self.max_length), np.int32)
        ids = self.hf_tokenizer(
            batch, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        )["input_ids"]
        return np.asarray(ids, dtype=np.int32)


def load_tokenizer(
    path: str | os.PathLike, *, subfolder: str = "tokenizer", max_length: int | None = None
) -> PromptTokenizer:
    """`PromptTokenizer.from_pretrained`; use subfolder='tokenizer_2' for SDXL's second tokenizer."""
    return PromptTokenizer.from_pretrained(path, subfolder=subfolder, max_length=max_length)
