"""The LAION aesthetic reward on a tiny random CLIP: shapes, batching, dtype, checkpoints, safety."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from diffusion_env import rewards
from diffusion_env.rewards.aesthetic import AestheticMLP, AestheticScorer, load_predictor
from diffusion_env.rewards import RewardError, make_reward

EMBED_DIM = 8


def tiny_clip():
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=EMBED_DIM,
    )
    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config), processor


@pytest.fixture(scope="module")
def scorer():
    clip, processor = tiny_clip()
    torch.manual_seed(1)
    return AestheticScorer(clip, processor, AestheticMLP(input_dim=EMBED_DIM), batch_size=2)


def images(batch=5, height=20, width=24):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8))


def test_scores_have_one_float32_per_image_and_do_not_depend_on_batching(scorer):
    batch = images()
    scores = scorer(batch, ["p"] * 5, [{}] * 5)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    one_by_one = torch.cat([scorer(batch[i : i + 1], ["p"], [{}]) for i in range(5)])
    torch.testing.assert_close(scores, one_by_one, rtol=1e-5, atol=1e-6)
    # Through the reward interface: a checked Reward, on the images' device.
    result = make_reward(scorer)(batch, ["p"] * 5, [{}] * 5)
    assert result.rewards.shape == (5,) and make_reward(scorer).name == "aesthetic"


def test_embeddings_are_unit_length_as_the_predictor_expects(scorer):
    embeddings = scorer.embed(images(batch=3))
    assert embeddings.shape == (3, EMBED_DIM)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_the_scorer_follows_its_dtype(scorer):
    double = copy.deepcopy(scorer).to(torch.float64)
    scores = double(images(), ["p"] * 5, [{}] * 5)
    assert next(double.clip.parameters()).dtype == torch.float64
    assert scores.dtype == torch.float32  # rewards stay float32 whatever the model runs in
    torch.testing.assert_close(scores, scorer(images(), ["p"] * 5, [{}] * 5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_saved_and_reloaded_predictor_gives_identical_scores(scorer, tmp_path, suffix):
    clip_dir = tmp_path / "clip"
    scorer.clip.save_pretrained(clip_dir)
    scorer.image_processor.save_pretrained(clip_dir)
    checkpoint = tmp_path / f"predictor{suffix}"
    state = {key: value.contiguous() for key, value in scorer.mlp.state_dict().items()}
    save_file(state, str(checkpoint)) if suffix == ".safetensors" else torch.save(state, checkpoint)
    reloaded = AestheticScorer.from_pretrained(clip_dir, checkpoint, input_dim=EMBED_DIM, batch_size=scorer.batch_size)
    for key, value in scorer.mlp.state_dict().items():  # bit for bit
        assert torch.equal(reloaded.mlp.state_dict()[key], value), key
    batch = images()
    # The same weights can differ in the last bit of a score: CPU GEMM kernels pick their SIMD path
    # by buffer alignment, which a reload changes. Identical up to float32 rounding:
    expected = scorer(batch, [""] * 5, [{}] * 5)
    torch.testing.assert_close(reloaded(batch, [""] * 5, [{}] * 5), expected, rtol=1e-6, atol=0)


class _Payload:
    """Pickles into a call that would create a file, if unpickling ran arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_arbitrary_objects_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": _Payload(marker)}, checkpoint)
    with pytest.raises(ValueError, match="refusing to load .*not a weights-only checkpoint"):
        load_predictor(checkpoint, input_dim=EMBED_DIM)
    assert not marker.exists()


def test_checkpoint_and_size_mismatches_are_clear(tmp_path, scorer):
    with pytest.raises(FileNotFoundError, match="does not exist; allowed"):
        load_predictor(tmp_path / "missing.pt")
    checkpoint = tmp_path / "wide.pt"
    torch.save(AestheticMLP(input_dim=768).state_dict(), checkpoint)
    with pytest.raises(ValueError, match=r"does not fit AestheticMLP\(input_dim=8\)"):
        load_predictor(checkpoint, input_dim=EMBED_DIM)
    with pytest.raises(ValueError, match="CLIP projects images to 8 dimensions but the predictor takes 768"):
        AestheticScorer(scorer.clip, scorer.image_processor, AestheticMLP())
    with pytest.raises(ValueError, match="'hf://<owner>/<repo>/<filename>'"):
        load_predictor("hf://only-owner")


def test_aesthetic_is_registered_lazily(monkeypatch):
    # A fresh interpreter: importing the package must not import the module that loads models.
    code = "import sys, diffusion_env; print('diffusion_env.learned_rewards' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"
    assert "aesthetic" in rewards.available_rewards()
    monkeypatch.delenv("DIFFUSION_ENV_AESTHETIC_PREDICTOR", raising=False)
    with pytest.raises(ValueError, match="needs the LAION predictor weights: set DIFFUSION_ENV_AESTHETIC_PREDICTOR"):
        make_reward("aesthetic")
    assert isinstance(rewards.registry.REWARDS.get("aesthetic"), rewards.registry.LazyReward)  # a failed build leaves the name to retry


def test_scorer_refuses_non_uint8_images(scorer):
    with pytest.raises(RewardError, match="images must be uint8"):
        make_reward(scorer)(torch.zeros(2, 8, 8, 3), ["p"] * 2, [{}] * 2)
