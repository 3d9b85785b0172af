"""The automated prompt-alignment reward of DDPO: caption the image, then compare caption and prompt.

Black et al. (2023), "Training Diffusion Models with Reinforcement Learning", Sec. 6.3, ask a
vision-language model (LLaVA) "what is going on in this image?" and reward the BERTScore recall
(Zhang et al., 2020, "BERTScore: Evaluating Text Generation with BERT") of its answer against the
prompt: with contextual token embeddings of the prompt x (reference) and the answer x̂ (candidate),

    R = 1/|x| sum_{x_i in x} max_{x̂_j in x̂} cos(x_i, x̂_j).

Recall, not precision, because a caption may say more than the prompt (a background, a style)
without being penalised, while every prompt word must find a match in the caption.

Three parts, each replaceable:

* a :class:`Captioner` (images -> strings): :class:`TransformersCaptioner` runs any transformers
  image-to-text model (BLIP, LLaVA, ...); the built-in world's offline
  :class:`~diffusion_env.shapes.rewards.SceneParserCaptioner` reads its scenes back;
* :class:`BertScoreRecall`, the scorer, on the MiniLM encoder that this package ships;
* :class:`PromptAlignmentReward`, the reward callable; :mod:`diffusion_env.shapes` registers it
  with the scene captioner as ``"prompt_alignment"``.

Differences from the reference BERTScore: no idf weighting and no baseline rescaling (the paper's
reward uses neither), and the last hidden layer of MiniLM rather than a tuned layer of RoBERTa.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from diffusion_env.backends.text_encoders import load_pretrained_text_model, minilm_path

#: The question the DDPO paper puts to LLaVA (Black et al., 2023, Sec. 6.3).
DDPO_QUESTION = "what is going on in this image?"


def check_image_batch(images: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``images`` is a uint8 tensor ``(B, H, W, 3)``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        description = (
            f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        )
        raise ValueError(f"images must be a uint8 torch tensor (B, H, W, 3), got {description}")


@runtime_checkable
class Captioner(Protocol):
    """Anything that writes one caption per image of a uint8 batch ``(B, H, W, 3)``."""

    def __call__(self, images: torch.Tensor) -> list[str]:
        """One caption per image, in order."""
        ...


class TransformersCaptioner:
    """Captions images with a transformers image-to-text model, optionally answering a question.

    Supported: models whose ``generate`` takes the processor's ``pixel_values`` (and, with a
    question, its ``input_ids``/``attention_mask``) and returns token ids that the processor's
    ``batch_decode`` reads, e.g.

    * BLIP (``BlipForConditionalGeneration``): the question conditions the caption as a text
      prefix ("conditional captioning", Li et al., 2022), as in the DDPO paper's question prompt;
    * decoder-only VLMs such as LLaVA (``LlavaForConditionalGeneration``): ``question`` is passed to
      the processor verbatim, so give it in the model's chat format, e.g.
      ``"USER: <image>\\nwhat is going on in this image? ASSISTANT:"``;
    * ``question=None``: unconditional captioning (BLIP, GIT, ...).

    Generation echoes the prompt in both families (BLIP drops the prompt's final [SEP] and replaces
    its first token by [BOS]); the echoed prompt is cut off so that only the answer is returned.
    Generation is greedy (``do_sample=False``), so a reward is a function of the image.

    Args:
        model: the image-to-text model (kept in eval mode, gradients off).
        processor: its processor (images and, for a question, text).
        question: the question or text prefix; None for a plain caption.
        max_new_tokens: the most tokens each answer may have.
        batch_size: images per ``generate`` call, bounding memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        question: str | None = DDPO_QUESTION,
        max_new_tokens: int = 32,
        batch_size: int = 16,
    ) -> None:
        if not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model {type(model).__name__} has no generate method; allowed: a transformers "
                "image-to-text model such as BlipForConditionalGeneration or LlavaForConditionalGeneration"
            )
        if not callable(getattr(processor, "batch_decode", None)):
            raise TypeError(
                f"processor {type(processor).__name__} has no batch_decode method; allowed: the model's "
                "transformers processor (e.g. BlipProcessor), which holds a tokenizer"
            )
        if question is not None and (not isinstance(question, str) or not question.strip()):
            raise ValueError(f"question must be a non-empty string or None, got {question!r}")
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.question = question
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        question: str | None = DDPO_QUESTION,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        **model_kwargs: Any,
    ) -> TransformersCaptioner:
        """Loads a model and its processor from a local directory or hub id (through the HF cache).

        The model class is chosen by ``AutoModelForImageTextToText``, which maps BLIP, BLIP-2,
        GIT, LLaVA and the other image-text-to-text architectures. Set ``HF_HUB_OFFLINE=1`` to
        forbid downloads. ``device`` defaults to CUDA when available; ``model_kwargs`` go to the model's
        ``from_pretrained`` (e.g. ``torch_dtype=torch.float16``).
        """
        # Imported here: a plain ``import diffusion_env`` loads no captioning model.
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = os.fspath(name_or_path)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
        target = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(target), processor, question, max_new_tokens, batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        """Answers (captions) of uint8 images ``(B, H, W, 3)``, one string per image."""
        check_image_batch(images)
        captions: list[str] = []
        for chunk in images.split(self.batch_size):
            captions.extend(self._caption_chunk(chunk))
        return captions

    def _caption_chunk(self, images: torch.Tensor) -> list[str]:
        parameter = next(self.model.parameters())
        # Host numpy HWC images: every transformers image processor accepts them.
        pictures = list(images.cpu().numpy())
        if self.question is None:
            inputs = self.processor(images=pictures, return_tensors="pt")
        else:
            # One question for every image: equal lengths, so no padding (and no pad-side issues).
            inputs = self.processor(images=pictures, text=[self.question] * len(pictures), return_tensors="pt")
        inputs = {
            key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        # Some generate methods return a ModelOutput when asked for scores; here only the ids count.
        sequences = output.sequences if hasattr(output, "sequences") else output
        answers = self._strip_prompt(sequences.cpu(), inputs.get("input_ids"))
        return [text.strip() for text in self.processor.batch_decode(answers, skip_special_tokens=True)]

    @staticmethod
    def _strip_prompt(sequences: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """The generated ids after the echoed prompt (all of them when the prompt is not echoed)."""
        if prompt is None:
            return sequences
        prompt = prompt.cpu()
        # Decoder-only models echo the whole prompt; BLIP echoes all but the final [SEP], with its
        # first token replaced by [BOS]. Compare from the second token so both are recognised.
        for echoed in (prompt.shape[1], prompt.shape[1] - 1):
            if 1 <= echoed <= sequences.shape[1] and torch.equal(sequences[:, 1:echoed], prompt[:, 1:echoed]):
                return sequences[:, echoed:]
        return sequences


class BertScoreRecall:
    """BERTScore recall (Zhang et al., 2020) of candidate texts against reference texts, batched.

    R(x, x̂) = 1/|x| sum_i max_j cos(x_i, x̂_j) over the reference's tokens x_i and the candidate's
    x̂_j, with contextual token embeddings (the encoder's last hidden states) and special ([CLS],
    [SEP]) and padding tokens excluded. It lies in [-1, 1]; identical texts score 1.

    An empty candidate (no token left once special tokens are removed) scores 0: a captioner that
    says nothing has matched nothing, and a reward should not stop training for it. An empty
    reference has no recall and raises.

    A text's token embeddings depend on that text alone (the encoder masks padding), so they are
    kept in a least-recently-used cache of ``cache_size`` texts: RL prompts repeat every batch, and
    the scene captioner's captions come from the same small vocabulary.

    Args:
        path: a local directory loadable with ``AutoTokenizer``/``AutoModel``; default the shipped
            MiniLM (``all-MiniLM-L6-v2``), loaded once per process and shared with the prompt encoder.
        batch_size: texts per encoder call.
        cache_size: the most texts whose embeddings are kept; 0 turns the cache off.
    """

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, cache_size: int = 4096) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0: no cache), got {cache_size!r}")
        self.path = str(path if path is not None else minilm_path())
        self.tokenizer, self.model = load_pretrained_text_model(self.path)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Unit-length embeddings ``(n_tokens, hidden_size)`` of each text's real (non-special) tokens."""
        fresh = list(dict.fromkeys(text for text in texts if text not in self._cache))
        computed: dict[str, torch.Tensor] = {}
        for start in range(0, len(fresh), self.batch_size):
            chunk = fresh[start : start + self.batch_size]
            tokens = self.tokenizer(
                chunk, padding=True, truncation=True, return_special_tokens_mask=True, return_tensors="pt"
            )
            special = tokens.pop("special_tokens_mask").bool()
            hidden = torch.nn.functional.normalize(self.model(**tokens).last_hidden_state.float(), dim=-1)
            keep = tokens["attention_mask"].bool() & ~special
            computed.update({text: states[mask] for text, states, mask in zip(chunk, hidden, keep)})
        embeddings = []
        for text in texts:
            if text in computed:
                embedding = computed[text]
            else:
                embedding = self._cache[text]
                self._cache.move_to_end(text)
            embeddings.append(embedding)
        if self.cache_size:
            self._cache.update(computed)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embeddings

    @torch.no_grad()
    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Recall ``(B,)`` float32 of each candidate against the reference at the same position.

        Raises:
            TypeError: if either argument is not a sequence of strings.
            ValueError: if their lengths differ or a reference is empty.
        """
        for name, texts in (("candidates", candidates), ("references", references)):
            if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
                raise TypeError(f"{name} must be a sequence of str, got {texts!r}")
        if len(candidates) != len(references):
            raise ValueError(
                f"got {len(candidates)} candidates and {len(references)} references; allowed: one reference per candidate"
            )
        reference_embeddings = self.embed(references)
        empty = [index for index, embedding in enumerate(reference_embeddings) if len(embedding) == 0]
        if empty:
            raise ValueError(f"references {empty} are empty; allowed: texts with at least one word")
        recall = np.zeros(len(candidates), dtype=np.float32)
        for index, (candidate, reference) in enumerate(zip(self.embed(candidates), reference_embeddings)):
            if len(candidate):
                recall[index] = (reference @ candidate.T).max(dim=1).values.mean()
        return recall


class PromptAlignmentReward:
    """The DDPO prompt-alignment reward (Black et al., 2023, Sec. 6.3): BERTScore recall of a caption.

    Each image is captioned by ``captioner`` and scored by ``scorer(captions, prompts)``, the recall
    of the prompt (reference) in the caption (candidate). Details: ``"captions"`` (numpy object
    array of B strings) and ``"bertscore_recall"`` (the reward itself, for logging in combinations).

    Args:
        captioner: images -> one caption each, e.g. a :class:`TransformersCaptioner`.
        scorer: default :class:`BertScoreRecall` on the shipped MiniLM.
    """

    def __init__(self, captioner: Captioner, scorer: BertScoreRecall | None = None) -> None:
        self.captioner: Captioner = captioner
        if not callable(self.captioner):
            raise TypeError(
                f"captioner must be callable (images -> list of str), got {type(self.captioner).__name__}"
            )
        self.scorer = scorer if scorer is not None else BertScoreRecall()
        self.__name__ = "prompt_alignment"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rewards ``(B,)`` float32 in [-1, 1] and the details above."""
        check_image_batch(images)
        captions = self.captioner(images)
        if isinstance(captions, str) or len(captions) != images.shape[0]:
            raise ValueError(
                f"captioner {type(self.captioner).__name__} returned {captions!r} for {images.shape[0]} images; "
                "allowed: a list of one str per image"
            )
        recall = self.scorer(list(captions), list(prompts))
        # An object array keeps each caption whole (a numpy str array would fix one width).
        caption_array = np.empty(len(captions), dtype=object)
        caption_array[:] = list(captions)
        return recall, {"captions": caption_array, "bertscore_recall": recall}
