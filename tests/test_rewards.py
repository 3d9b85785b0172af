"""Rewards: the JPEG rewards against PIL directly, the registry, and user callables."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_env import rewards
from diffusion_env.shapes import scenes
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

    rewards.register_reward("test_brightness", brightness)
    try:
        assert "test_brightness" in rewards.available_rewards()
        assert make_reward("test_brightness").name == "test_brightness"
        with pytest.raises(ValueError, match="already registered"):
            rewards.register_reward("test_brightness", brightness)
    finally:
        rewards.registry.REWARDS.remove("test_brightness")


def test_details_of_the_wrong_length_are_refused():
    reward = Reward(lambda images, prompts, metadata: (np.zeros(3), {"score": np.zeros(2)}), name="short")
    with pytest.raises(RewardError, match=r"detail 'score' has shape \(2,\); allowed: length 3"):
        reward(images(), ["a"] * 3, [{}] * 3)


def test_register_refuses_what_is_not_callable():
    with pytest.raises(TypeError, match="must be callable"):
        rewards.register_reward("broken", 3)


# ---------------------------------------------------------------- colorfulness (Hasler and Suesstrunk, 2003)


def test_a_grey_image_has_zero_colorfulness():
    grey = torch.full((2, 8, 8, 3), 77, dtype=torch.uint8)
    grey[1] = 200
    result = make_reward("colorfulness")(grey, ["p"] * 2, [{}] * 2)
    np.testing.assert_allclose(result.rewards.numpy(), [0.0, 0.0], atol=1e-6)


def test_colorfulness_of_a_red_and_blue_image_matches_the_hand_computation():
    # Half pure red (rg = 255, yb = 127.5), half pure blue (rg = 0, yb = -255): each opponent
    # channel takes two values equally often, so its mean is their midpoint and its (population)
    # standard deviation half their distance.
    image = torch.zeros((1, 4, 4, 3), dtype=torch.uint8)
    image[0, :, :2, 0] = 255
    image[0, :, 2:, 2] = 255
    mean_rg, std_rg = 255 / 2, 255 / 2
    mean_yb, std_yb = (127.5 - 255) / 2, (127.5 + 255) / 2
    expected = math.sqrt(std_rg**2 + std_yb**2) + 0.3 * math.sqrt(mean_rg**2 + mean_yb**2)
    result = make_reward("colorfulness")(image, ["p"], [{}])
    np.testing.assert_allclose(result.rewards.numpy(), [expected], rtol=1e-6)
    np.testing.assert_allclose(result.details["colorfulness_spread"], [math.hypot(std_rg, std_yb)], rtol=1e-6)


# ---------------------------------------------------------------- weighted combinations


def test_a_combination_string_is_the_weighted_sum_with_each_component_in_the_details():
    batch = images()
    jpeg = make_reward("jpeg_compressibility")(batch, ["p"] * 3, [{}] * 3)
    colour = make_reward("colorfulness")(batch, ["p"] * 3, [{}] * 3)
    combined = make_reward("jpeg_compressibility + 0.5*colorfulness - 2e-1 * jpeg_incompressibility")
    result = combined(batch, ["p"] * 3, [{}] * 3)
    expected = jpeg.rewards + 0.5 * colour.rewards - 0.2 * (-jpeg.rewards)
    np.testing.assert_allclose(result.rewards.numpy(), expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(result.details["colorfulness"], colour.rewards.numpy())
    np.testing.assert_allclose(result.details["jpeg_compressibility"], jpeg.rewards.numpy())
    # Both JPEG rewards report "jpeg_kb": namespacing keeps both.
    np.testing.assert_allclose(result.details["jpeg_compressibility/jpeg_kb"], jpeg.details["jpeg_kb"])
    np.testing.assert_allclose(result.details["jpeg_incompressibility/jpeg_kb"], jpeg.details["jpeg_kb"])
    assert combined.name == "jpeg_compressibility+0.5*colorfulness-2e-1*jpeg_incompressibility"


def test_a_list_of_pairs_mixes_names_and_callables():
    def ones(images, prompts, metadata):
        return np.ones(len(prompts))

    batch = images()
    result = make_reward([("colorfulness", 2.0), (ones, -3)])(batch, ["p"] * 3, [{}] * 3)
    colour = make_reward("colorfulness")(batch, ["p"] * 3, [{}] * 3).rewards
    np.testing.assert_allclose(result.rewards.numpy(), (2 * colour - 3).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(result.details["ones"], [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "expression, message",
    [
        ("jpeg_compressibility++colorfulness", r"at character 20 \('\+\+colorfulness'\)"),
        ("0.5*", r"at character 0 \('0.5\*'\); expected a term"),
        ("colorfulness 2*jpeg_compressibility", r"expected '\+' or '-' and a term"),
        ("2**colorfulness", "at character 0"),
        ("colorfulness+", r"at character 12 \('\+'\)"),
    ],
)
def test_combinations_that_do_not_parse_say_where_and_what_is_allowed(expression, message):
    with pytest.raises(ValueError, match=message) as error:
        make_reward(expression)
    assert "allowed: terms 'name' or '<float>*name'" in str(error.value)


def test_combinations_refuse_unknown_names_repeats_and_bad_weights():
    with pytest.raises(ValueError, match="unknown reward 'colourfulness'"):
        make_reward("jpeg_compressibility+colourfulness")
    with pytest.raises(ValueError, match="appears twice"):
        make_reward("colorfulness+2*colorfulness")
    with pytest.raises(ValueError, match="allowed: a finite number"):
        make_reward([("colorfulness", float("nan"))])
    with pytest.raises(ValueError, match="at least one"):
        make_reward([])
    with pytest.raises(ValueError, match="contains '\\+', '-' or '\\*'"):
        rewards.register_reward("a+b", lambda images, prompts, metadata: np.zeros(len(prompts)))


def test_a_failing_component_names_itself():
    def broken(images, prompts, metadata):
        raise KeyError("missing")

    with pytest.raises(RewardError, match="reward 'broken' raised KeyError"):
        make_reward([("colorfulness", 1.0), (broken, 1.0)])(images(), ["p"] * 3, [{}] * 3)


def test_factories_build_on_first_use_only():
    built = []

    def factory():
        built.append(True)
        return lambda images, prompts, metadata: np.zeros(len(prompts))

    rewards.register_factory("test_lazy", factory)
    try:
        assert "test_lazy" in rewards.available_rewards() and not built
        make_reward("test_lazy")
        make_reward("test_lazy")
        assert built == [True]
    finally:
        rewards.registry.REWARDS.remove("test_lazy")


# ---------------------------------------------------------------- scene alignment


def test_scene_alignment_scores_the_fraction_of_the_prompts_attributes_shown():
    rng = np.random.default_rng(0)
    drawn = [
        scenes.sample_scene(rng, background="blue", color="red", shape="circle", count=2, size="large"),
        scenes.sample_scene(rng, background="black", color="yellow", shape="square", count=1, size="large"),
    ]
    batch = torch.from_numpy(np.stack([scenes.render_scene(scene) for scene in drawn]))
    metadata = [
        drawn[0].metadata,  # all five right
        {"background": "black", "color": "green", "shape": "square", "count": 3},  # 2 of 4 right, no size
    ]
    result = make_reward("scene_alignment")(batch, ["p", "q"], metadata)
    np.testing.assert_allclose(result.rewards.numpy(), [1.0, 0.5])
    np.testing.assert_array_equal(result.details["scene_color"], [1.0, 0.0])
    np.testing.assert_array_equal(result.details["scene_count"], [1.0, 0.0])
    assert np.isnan(result.details["scene_size"][1]) and result.details["scene_size"][0] == 1.0


def test_scene_alignment_needs_scene_metadata():
    with pytest.raises(RewardError, match="needs at least one of"):
        make_reward("scene_alignment")(images(batch=1), ["a cat"], [{}])


def test_detail_means_average_only_where_a_detail_is_defined():
    from diffusion_env.rewards import RewardResult

    result = RewardResult(
        rewards=torch.zeros(3),
        details={"count": np.array([1.0, np.nan, 0.0]), "size": np.full(3, np.nan), "shape": np.ones(3)},
    )
    assert result.detail_means() == {"count": 0.5, "shape": 1.0}
