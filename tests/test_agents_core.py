"""The DDPO building blocks: objectives on hand-computed cases, the stat tracker, rollout collection."""

import math

import numpy as np
import pytest
import torch

from agents import GaussianDenoisingPolicy
from agents.advantages import PerPromptStatTracker, batch_normalized_advantages, clip_advantages
from agents.losses import (
    clipped_surrogate_loss,
    reward_weights,
    score_function_loss,
    sparse_reward_weights,
    weighted_denoising_loss,
)
from agents.rollouts import Trajectories, collect_trajectories
from diffusion_env.samplers.base import per_dimension
from tests.conftest import NUM_STEPS


def test_score_function_loss_and_its_gradient():
    log_probs = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = score_function_loss(log_probs, torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(-(1 * 1 + -1 * 2) / 2)
    loss.backward()
    assert log_probs.grad.tolist() == [-0.5, 0.5]


def test_clipped_surrogate_on_hand_computed_ratios():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))
    advantages = torch.tensor([1.0, -1.0, 1.0, 2.0])
    loss, stats = clipped_surrogate_loss(new - old, advantages, clip_range=0.2)
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2;  ratio 1.5, A=-1: max(1.5, 1.2) = 1.5
    # ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5;  ratio 1.1, A=+2: max(-2.2, -2.2) = -2.2
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 - 2.2) / 4)
    assert float(stats["clip_fraction"]) == pytest.approx(3 / 4)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * float((new**2).mean()))


def test_per_dimension_ratio_divides_the_log_ratio_by_d():
    old, new = torch.zeros(1), torch.tensor([3000.0 * 1e-5])
    latents = torch.zeros(1, 3, 25, 40)  # D = 3,000
    loss, stats = clipped_surrogate_loss(per_dimension(new - old, latents), torch.ones(1), clip_range=1e-4)
    assert float(loss) == pytest.approx(-math.exp(1e-5))  # within the clip: ratio e^(1e-5)
    assert float(stats["clip_fraction"]) == 0.0
    loss_full, _ = clipped_surrogate_loss(new - old, torch.ones(1), clip_range=1e-4)
    assert float(loss_full) == pytest.approx(-(1 + 1e-4))  # exact ratio e^0.03 is clipped


def test_reward_weights():
    weights = reward_weights(torch.tensor([0.0, math.log(3.0)]), beta=1.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5]))
    huge = reward_weights(torch.tensor([1e4, 0.0]), beta=1.0)
    assert torch.isfinite(huge).all() and huge.tolist() == [2.0, 0.0]
    assert sparse_reward_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), 50).tolist() == [0, 0, 1, 1]
    loss = weighted_denoising_loss(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0.0, 2.0]))
    assert float(loss) == pytest.approx((0 * 1 + 2 * 1) / 2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        reward_weights(torch.zeros(2), beta=0)


def test_batch_normalisation_and_clipping():
    advantages = batch_normalized_advantages(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    assert clip_advantages(torch.tensor([-7.0, 0.5, 9.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]


def test_stat_tracker_falls_back_to_batch_statistics_then_uses_the_prompts_own():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 7.0]))
    batch_mean, batch_std = 4.0, float(np.std([1, 3, 5, 7]))
    torch.testing.assert_close(first, (torch.tensor([1.0, 3.0, 5.0, 7.0]) - batch_mean) / (batch_std + 1e-6))
    second = tracker.update(["a", "b"], torch.tensor([2.0, 100.0]))
    # "a" now holds [1, 3, 2]: its own mean 2 and std sqrt(2/3); "b" likewise [5, 7, 100].
    assert float(second[0]) == pytest.approx(0.0, abs=1e-6)
    b = np.array([5.0, 7.0, 100.0])
    assert float(second[1]) == pytest.approx((100 - b.mean()) / (b.std() + 1e-6), rel=1e-5)
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers == tracker.buffers and restored.min_count == 3


def test_collected_log_probs_equal_the_batched_recomputation(make_vec_env):
    env = make_vec_env(num_envs=3, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    trajectories = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=1)
    assert trajectories.latents.shape == (3, NUM_STEPS + 1, 3, 16, 16)
    assert trajectories.log_probs.shape == (3, NUM_STEPS) and trajectories.rewards.shape == (3,)
    pairs = list(trajectories.minibatches(5, torch.Generator().manual_seed(0)))
    seen = torch.cat([samples * NUM_STEPS + steps for samples, steps in pairs])
    assert sorted(seen.tolist()) == list(range(3 * NUM_STEPS))
    with torch.no_grad():
        for samples, steps in pairs:  # minibatches that mix samples and timesteps
            recomputed = policy.log_prob(trajectories.observations(samples, steps), trajectories.actions(samples, steps))
            torch.testing.assert_close(recomputed, trajectories.log_probs[samples, steps], rtol=1e-5, atol=1e-3)


def test_trajectories_keep_the_final_images_and_concatenate_in_order(make_vec_env):
    env = make_vec_env(num_envs=2, array_type="torch", prompts="scenes_train")
    policy = GaussianDenoisingPolicy.from_env(env)
    generator = torch.Generator().manual_seed(0)
    first, second = (collect_trajectories(env, policy, generator=generator) for _ in range(2))
    # The images are the decoded last latents, the ones the reward scored.
    torch.testing.assert_close(first.images, policy.backend.decode(first.latents[:, -1]), rtol=0, atol=0)
    assert first.metadata and first.metadata[0]["background"] in first.prompts[0]
    both = Trajectories.concatenate([first, second])
    assert both.batch_size == 4 and both.prompts == first.prompts + second.prompts
    assert both.metadata == first.metadata + second.metadata
    torch.testing.assert_close(both.images[2:], second.images, rtol=0, atol=0)
    torch.testing.assert_close(both.log_probs[:2], first.log_probs, rtol=0, atol=0)


def test_collect_trajectories_needs_torch_arrays(make_vec_env):
    env = make_vec_env(num_envs=1)
    with pytest.raises(ValueError, match="array_type='torch'"):
        collect_trajectories(env, GaussianDenoisingPolicy.from_env(env))


def _trained_copy(make_vec_env, config, steps=1):
    import copy

    from agents.advantages import batch_normalized_advantages
    from agents.algorithms.ddpo import ddpo_update

    env = make_vec_env(num_envs=4, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    reference = copy.deepcopy(policy)
    optimizer = torch.optim.AdamW(policy.backend.unet.parameters(), lr=1e-3)
    optimizer_steps = []
    optimizer.register_step_post_hook(lambda *_: optimizer_steps.append(1))
    generator = torch.Generator().manual_seed(0)
    figures = {}
    for _ in range(steps):
        trajectories = collect_trajectories(env, policy, generator=generator, seed=0)
        advantages = batch_normalized_advantages(trajectories.rewards)
        figures = ddpo_update(policy, trajectories, advantages, optimizer, config, generator, reference_policy=reference)
    figures["optimizer_steps"] = len(optimizer_steps)
    return policy, reference, figures


@pytest.mark.parametrize("estimator", ["sf", "is"])
def test_a_ddpo_update_changes_the_network_and_logs_finite_figures(make_vec_env, estimator):
    from agents.algorithms.ddpo import DDPOConfig

    config = DDPOConfig(estimator=estimator, minibatch_size=6, gradient_accumulation=2, inner_epochs=2,
                        timestep_fraction=0.5, kl_coefficient=0.1)
    policy, reference, figures = _trained_copy(make_vec_env, config)
    changed = [not torch.equal(p, q) for p, q in zip(policy.backend.unet.parameters(), reference.backend.unet.parameters())]
    assert any(changed)
    assert all(math.isfinite(v) for v in figures.values())
    assert "losses/kl_to_reference" in figures and "losses/grad_norm" in figures
    assert ("losses/clip_fraction" in figures) == (estimator == "is")
    # 4 samples x 2 of 4 timesteps = 8 pairs = 2 minibatches of <= 6: IS steps once per 2
    # minibatches in each of 2 inner epochs; SF steps once per batch, whatever is configured.
    assert figures["optimizer_steps"] == (2 if estimator == "is" else 1)


def test_a_non_finite_loss_stops_training_before_the_update(make_vec_env):
    from agents.algorithms.ddpo import DDPOConfig, NonFiniteError, ddpo_update

    env = make_vec_env(num_envs=2, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    before = [p.clone() for p in policy.backend.unet.parameters()]
    trajectories = collect_trajectories(env, policy, seed=0)
    optimizer = torch.optim.SGD(policy.backend.unet.parameters(), lr=1.0)
    with pytest.raises(NonFiniteError, match="loss is nan"):
        ddpo_update(policy, trajectories, torch.full((2,), float("nan")), optimizer,
                    DDPOConfig(estimator="sf"), torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(policy.backend.unet.parameters(), before))


@pytest.mark.parametrize("weighting", ["exponential", "sparse"])
def test_an_rwr_update_fits_the_network_to_its_weighted_samples(make_vec_env, weighting):
    from agents.algorithms.rwr import RWRConfig, rwr_update

    env = make_vec_env(num_envs=4, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    before = [p.clone() for p in policy.backend.unet.parameters()]
    trajectories = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    optimizer = torch.optim.AdamW(policy.backend.unet.parameters(), lr=1e-3)
    figures = rwr_update(policy, trajectories, optimizer, RWRConfig(weighting=weighting, percentile=50, minibatch_size=3),
                         torch.Generator().manual_seed(0))
    assert math.isfinite(figures["losses/rwr_loss"]) and figures["losses/weight_max"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(policy.backend.unet.parameters(), before))


def test_rwr_weights_come_from_the_given_scores_in_place_of_the_rewards(make_vec_env):
    import copy
    import dataclasses

    from agents.algorithms.rwr import RWRConfig, rwr_update

    env = make_vec_env(num_envs=4, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    trajectories = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    scores = torch.tensor([2.0, -1.0, 0.5, -1.5])
    config = RWRConfig(beta=2.0, minibatch_size=2)
    results = []
    for batch, given in ((trajectories, scores), (dataclasses.replace(trajectories, rewards=scores), None)):
        trained = copy.deepcopy(policy)
        optimizer = torch.optim.AdamW(trained.backend.unet.parameters(), lr=1e-3)
        figures = rwr_update(trained, batch, optimizer, config, torch.Generator().manual_seed(0), given)
        results.append((figures, list(trained.backend.unet.parameters())))
    assert results[0][0] == results[1][0]
    assert results[0][0]["losses/weight_max"] == pytest.approx(float(torch.softmax(2.0 * scores, 0).max() * 4))
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    with pytest.raises(ValueError, match="one per sample"):
        rwr_update(policy, trajectories, optimizer, config, torch.Generator(), torch.zeros(3))


def test_min_and_max_sigma_pick_the_window_of_steps_trained_on(make_vec_env, trained_steps):
    from agents.algorithms.ddpo import DDPOConfig, ddpo_update

    env = make_vec_env(num_envs=2, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    trajectories = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    sigma = policy.sampler.sigma.cpu()
    ascending = sigma.sort().values
    optimizer = torch.optim.AdamW(policy.backend.unet.parameters(), lr=1e-4)
    advantages = torch.tensor([1.0, -1.0])
    # min_sigma at the second smallest sigma_t leaves out the step with the smallest one only,
    # max_sigma at the second largest the step with the largest one only.
    for config, left_out in (
        (DDPOConfig(min_sigma=float(ascending[1])), int(sigma.argmin())),
        (DDPOConfig(max_sigma=float(ascending[-2])), int(sigma.argmax())),
    ):
        ddpo_update(policy, trajectories, advantages, optimizer, config, torch.Generator().manual_seed(0))
        assert trained_steps.pop() == sorted(set(range(NUM_STEPS)) - {left_out})
    for config in (DDPOConfig(min_sigma=float(sigma.max()) + 1.0), DDPOConfig(max_sigma=float(sigma.min()) / 2)):
        with pytest.raises(ValueError, match="exclude every step"):
            ddpo_update(policy, trajectories, advantages, optimizer, config, torch.Generator())
    with pytest.raises(ValueError, match="max_sigma=0.1 < min_sigma=0.2"):
        DDPOConfig(min_sigma=0.2, max_sigma=0.1)
