"""Rewards: the JPEG rewards against PIL directly, the registry, and user callables."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_env import rewards
from diffusion_env.rewards import Reward, RewardError, make_reward


def images(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)
    noise[0] = 128  # a flat image compresses far better than noise
    return torch.from_numpy(noise)


def pil_jpeg_kb(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_the_file_size_in_kb_at_quality_95():
    batch = images()
    expected = np.array([pil_jpeg_kb(p) for p in batch.numpy()], dtype=np.float32)
    incompressible = make_reward("jpeg_incompressibility")(batch, ["p"] * 3, [{}] * 3)
    compressible = make_reward("jpeg_compressibility")(batch, ["p"] * 3, [{}] * 3)
    np.testing.assert_allclose(incompressible.rewards.numpy(), expected)
    np.testing.assert_allclose(compressible.rewards.numpy(), -expected)
    np.testing.assert_allclose(compressible.details["jpeg_kb"], expected)
    assert expected[0] < expected[1] and compressible.rewards.dtype == torch.float32


def test_user_callables_and_registered_names_are_both_accepted():
    def brightness(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)) / 255, {"prompt_length": [len(p) for p in prompts]}

    result = make_reward(brightness)(images(), ["a", "bb", "ccc"], [{}] * 3)
    assert result.rewards.shape == (3,)
    np.testing.assert_array_equal(result.details["prompt_length"], [1, 2, 3])

    rewards.register("test_brightness", brightness)
    try:
        assert "test_brightness" in rewards.available_rewards()
        assert make_reward("test_brightness").name == "test_brightness"
        with pytest.raises(ValueError, match="already registered"):
            rewards.register("test_brightness", brightness)
    finally:
        rewards._REGISTRY.pop("test_brightness")


def test_details_of_the_wrong_length_are_refused():
    reward = Reward(lambda images, prompts, metadata: (np.zeros(3), {"score": np.zeros(2)}), name="short")
    with pytest.raises(RewardError, match=r"detail 'score' has shape \(2,\); allowed: length 3"):
        reward(images(), ["a"] * 3, [{}] * 3)


def test_register_refuses_what_is_not_callable():
    with pytest.raises(TypeError, match="must be callable"):
        rewards.register("broken", 3)
