"""Rewards computed by learned models: the LAION aesthetic predictor, as the DDPO paper uses it.

DDPO (Black et al., 2023, Sec. 6.1) rewards aesthetic quality with the LAION aesthetic predictor
(Schuhmann, "LAION-Aesthetics", 2022; trained on SAC, LAION-Logos and AVA ratings): a small MLP
over L2-normalised CLIP ViT-L/14 image embeddings (Radford et al., 2021) that regresses a 1-10
rating. This module loads nothing on import; the registry builds the scorer on first use (see
:func:`aesthetic_from_environment`).

Checkpoints are loaded without running arbitrary pickle code: safetensors files, or PyTorch files
through ``torch.load(weights_only=True)``, which refuses any object but tensors and containers.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The CLIP model the LAION predictor was trained on (its image embeddings are 768-dimensional).
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
#: Environment variable naming the predictor checkpoint for ``make_reward("aesthetic")``.
PREDICTOR_ENV_VAR = "DIFFUSION_ENV_AESTHETIC_PREDICTOR"
#: Environment variable naming the CLIP model for ``make_reward("aesthetic")`` (default DEFAULT_CLIP).
CLIP_ENV_VAR = "DIFFUSION_ENV_AESTHETIC_CLIP"
#: Prefix of a predictor checkpoint on the Hugging Face Hub: ``hf://<repo_id>/<file in the repo>``.
HUB_PREFIX = "hf://"


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's MLP head.

    Layers and their indices match the released checkpoint (``layers.0`` ... ``layers.7``), so its
    state dict loads as is. Dropout is only active in training mode; scoring uses ``eval()``.

    Args:
        input_dim: the CLIP image-embedding size (768 for ViT-L/14).
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, input_dim)`` normalised embeddings; returns ``(B,)``."""
        return self.layers(embeddings).squeeze(-1)


def resolve_checkpoint(path_or_hub: str | os.PathLike[str]) -> Path:
    """A local checkpoint path, or ``hf://<repo_id>/<filename>`` resolved through the hub cache.

    The hub is reached through ``huggingface_hub.hf_hub_download``, so ``HF_HUB_OFFLINE=1`` and the
    usual cache apply.

    Raises:
        FileNotFoundError: if a local path does not exist.
        ValueError: for an ``hf://`` address without a repo id and a filename.
    """
    text = os.fspath(path_or_hub)
    if text.startswith(HUB_PREFIX):
        parts = text[len(HUB_PREFIX) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise ValueError(
                f"predictor address {text!r} is incomplete; allowed: a local file or "
                "'hf://<owner>/<repo>/<filename>'"
            )
        from huggingface_hub import hf_hub_download  # imported here: only hub addresses need it

        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"predictor checkpoint {text!r} does not exist; allowed: a local .safetensors/.pt/.pth "
            "file or 'hf://<owner>/<repo>/<filename>'"
        )
    return path


def load_predictor(path_or_hub: str | os.PathLike[str], input_dim: int = 768) -> AestheticMLP:
    """Loads an :class:`AestheticMLP` from a safetensors or a weights-only PyTorch checkpoint.

    Raises:
        ValueError: if the file holds anything but a state dict of tensors (a pickle with other
            objects is refused before any of its code runs), or the tensors do not fit the MLP.
    """
    path = resolve_checkpoint(path_or_hub)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # imported here: only safetensors files need it

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"refusing to load {str(path)!r}: it is not a weights-only checkpoint ({error}); allowed: "
                "a .safetensors file or a torch.save'd state dict of tensors"
            ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} holds a {type(state).__name__}, not a state dict; allowed: a mapping of "
            "parameter names ('layers.0.weight', ...) to tensors"
        )
    mlp = AestheticMLP(input_dim)
    try:
        mlp.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{str(path)!r} does not fit AestheticMLP(input_dim={input_dim}): {error}") from error
    return mlp.eval()


class AestheticScorer(nn.Module):
    """The DDPO aesthetic reward: LAION predictor on L2-normalised CLIP image embeddings.

    A reward callable ``(images, prompts, metadata) -> scores`` (prompts are not used). Move it
    with ``.to(device, dtype)``: images are preprocessed on the host by the CLIP processor and
    sent to the model's device and dtype; scores come back float32 on that device.

    Args:
        clip_model: a transformers ``CLIPModel`` (only its vision tower and projection are used).
        processor: a ``CLIPProcessor`` or ``CLIPImageProcessor`` (resizing, cropping, normalising).
        mlp: the predictor head; its ``input_dim`` must equal the CLIP ``projection_dim``.
        batch_size: images per CLIP forward pass, which bounds activation memory.

    Raises:
        ValueError: if the CLIP embedding size and the MLP input size differ, or batch_size < 1.
    """

    def __init__(self, clip_model: nn.Module, processor: Any, mlp: AestheticMLP, batch_size: int = 32) -> None:
        super().__init__()
        projection_dim = clip_model.config.projection_dim
        if projection_dim != mlp.input_dim:
            raise ValueError(
                f"CLIP projects images to {projection_dim} dimensions but the predictor takes {mlp.input_dim}; "
                "allowed: a predictor trained on this CLIP (768 for ViT-L/14)"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.clip = clip_model.eval()
        self.mlp = mlp.eval()
        # A full CLIPProcessor also tokenises text; only its image half is needed.
        self.image_processor = getattr(processor, "image_processor", processor)
        self.batch_size = batch_size
        self.__name__ = "aesthetic"
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        clip_path_or_id: str | os.PathLike[str],
        predictor_path: str | os.PathLike[str],
        input_dim: int = 768,
        batch_size: int = 32,
    ) -> AestheticScorer:
        """Builds the scorer from a CLIP directory or hub id and a predictor checkpoint.

        Both resolve through the hub cache when given as ids (``predictor_path`` as
        ``hf://<owner>/<repo>/<filename>``); set ``HF_HUB_OFFLINE=1`` to forbid downloads.
        """
        from transformers import CLIPImageProcessor, CLIPModel  # imported here: loading is opt-in

        clip = CLIPModel.from_pretrained(os.fspath(clip_path_or_id))
        processor = CLIPImageProcessor.from_pretrained(os.fspath(clip_path_or_id))
        return cls(clip, processor, load_predictor(predictor_path, input_dim), batch_size=batch_size)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, projection_dim)`` of uint8 ``(B, H, W, 3)`` images."""
        parameter = next(self.clip.parameters())
        # channels-first uint8 on the host: the processor's resize and crop run there.
        pixels = self.image_processor(images=list(images.permute(0, 3, 1, 2).cpu()), return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
        # vision_model + visual_projection, rather than get_image_features, whose return type
        # changed between transformers versions (a tensor in 4.x, a model output in 5.x).
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        embeddings = self.clip.visual_projection(pooled)
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """Aesthetic scores ``(B,)`` float32 of uint8 images ``(B, H, W, 3)``."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 (B, H, W, 3), got {images.dtype} of shape {tuple(images.shape)}"
            )
        mlp_dtype = next(self.mlp.parameters()).dtype
        scores = [
            self.mlp(self.embed(chunk).to(mlp_dtype)).float()
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(scores)


def aesthetic_from_environment() -> AestheticScorer:
    """The registry's factory for ``make_reward("aesthetic")``.

    Reads the predictor checkpoint from ``$DIFFUSION_ENV_AESTHETIC_PREDICTOR`` and the CLIP model
    from ``$DIFFUSION_ENV_AESTHETIC_CLIP`` (default ``openai/clip-vit-large-patch14``); moves the
    scorer to CUDA when available. For other settings, register a scorer yourself:
    ``register("aesthetic", AestheticScorer.from_pretrained(...), overwrite=True)``.

    Raises:
        ValueError: if no predictor checkpoint is configured.
    """
    predictor = os.environ.get(PREDICTOR_ENV_VAR)
    if not predictor:
        raise ValueError(
            f"the 'aesthetic' reward needs the LAION predictor weights: set {PREDICTOR_ENV_VAR} to a local "
            "checkpoint or 'hf://<owner>/<repo>/<filename>', or register AestheticScorer.from_pretrained(...)"
        )
    scorer = AestheticScorer.from_pretrained(os.environ.get(CLIP_ENV_VAR, DEFAULT_CLIP), predictor)
    return scorer.to("cuda") if torch.cuda.is_available() else scorer
