"""GRPO: its advantages and loss on hand-computed cases, shared-noise and branched groups, and its options end to end."""

import copy
import dataclasses
import math
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agents.advantages import group_relative_advantages, groups_with_spread
from agents.algorithms import UpdateContext, get_algorithm
from agents.algorithms.grpo import GRPOConfig, advantages as grpo_advantages, grpo_update
from agents.config import ConfigError, TrainConfig
from agents.losses import importance_sampled_loss
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from agents.step_window import StepWindow
from agents.train import train
from tests.conftest import NUM_STEPS

PROMPTS = ["a red circle on a blue background", "two green squares", "three small triangles"]


# ---------------------------------------------------------------------------- advantages and loss


def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    # Group means 2, 2, 2; group stds 1, 0, 2; the batch's std sqrt(10 / 6).
    by_group = group_relative_advantages(rewards, groups)
    assert torch.allclose(by_group, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-5)
    by_batch = group_relative_advantages(rewards, groups, "batch")
    assert torch.allclose(by_batch, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / math.sqrt(10 / 6), atol=1e-5)
    # Groups are named by any integers, in any order, of any size.
    shuffled = group_relative_advantages(torch.tensor([5.0, 1.0, 7.0, 3.0, 2.0]), torch.tensor([9, 4, 9, 4, 4]))
    assert torch.allclose(shuffled, torch.tensor([-1.0, -1.2247, 1.0, 1.2247, 0.0]), atol=1e-4)
    assert groups_with_spread(rewards, groups).tolist() == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="allowed: 'group' or 'batch'"):
        group_relative_advantages(rewards, groups, "prompt")
    with pytest.raises(ValueError, match="one per reward"):
        group_relative_advantages(rewards, groups[:3])


def test_the_clipped_importance_sampled_loss_by_hand():
    log_probs, old = torch.tensor([0.1, -0.1]), torch.zeros(2)
    advantages = torch.tensor([1.0, -1.0])
    actions = torch.zeros(2, 4)
    # ratios e^0.1 and e^-0.1, clipped to [0.95, 1.05]: max(-1.105, -1.05) = -1.05, max(0.905, 0.95) = 0.95.
    loss, stats = importance_sampled_loss(log_probs, old, advantages, actions, 0.05, per_dimension_ratio=False)
    assert float(loss) == pytest.approx((-1.05 + 0.95) / 2)
    assert float(stats["clip_fraction"]) == 1.0 and float(stats["approx_kl"]) == pytest.approx(0.005)
    # Per dimension (D = 4): ratios e^0.025 and e^-0.025, inside the clip.
    loss, _ = importance_sampled_loss(log_probs, old, advantages, actions, 0.05, per_dimension_ratio=True)
    assert float(loss) == pytest.approx((-math.exp(0.025) + math.exp(-0.025)) / 2)


def test_the_sliding_window_moves_by_its_stride_every_few_epochs_and_wraps():
    steps = torch.arange(2, 8)
    config = GRPOConfig(window_size=2, window_stride=1, window_shift_every=2)
    starts = [int(config.sliding_window(steps, epoch)[0]) for epoch in range(12)]
    assert starts == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 2, 2]
    assert config.sliding_window(steps, 3).tolist() == [3, 4]
    assert GRPOConfig(window_size=2, window_stride=3).sliding_window(steps, 1).tolist() == [5, 6]
    assert torch.equal(GRPOConfig().sliding_window(steps, 5), steps)
    assert torch.equal(GRPOConfig(window_size=9).sliding_window(steps, 5), steps)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"advantage_scale": "prompt"}, "advantage_scale='prompt'; allowed: 'group' or 'batch'"),
        ({"target_kl": 0.0}, "target_kl=0 is out of range; allowed: 0 < target_kl"),
        ({"window_size": -1}, "window_size=-1 is out of range; allowed: an integer 0 <= window_size"),
        ({"window_shift_every": 0}, "window_shift_every=0 is out of range; allowed: an integer 1 <= window_shift_every"),
        ({"timestep_fraction": 0.0}, "timestep_fraction=0 is out of range; allowed: 0 < timestep_fraction <= 1"),
    ],
)
def test_grpo_refuses_settings_out_of_range(values, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**values)


# ---------------------------------------------------------------------------- groups in the environment


def test_shared_noise_gives_a_group_one_x_t_and_groups_different_ones(make_vec_env):
    env = make_vec_env(num_envs=6, samples_per_prompt=3, array_type="torch", prompts=PROMPTS)
    latents = env.reset(seed=0, options={"shared_noise": True})[0]["latent"]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    assert torch.equal(latents[3], latents[4]) and torch.equal(latents[3], latents[5])
    assert not torch.equal(latents[0], latents[3])
    # Off (the default), every episode has its own x_T, as before the option existed.
    independent = env.reset(seed=0)[0]["latent"]
    assert all(not torch.equal(independent[i], independent[j]) for i in range(6) for j in range(i))
    assert torch.equal(env.reset(seed=0, options={"shared_noise": False})[0]["latent"], independent)
    assert env.unwrapped.samples_per_prompt == 3


def test_a_branch_reset_reproduces_the_trajectory_from_its_step_bit_for_bit(make_vec_env):
    env = make_vec_env(num_envs=4, samples_per_prompt=2, array_type="torch", prompts=PROMPTS)
    policy = GaussianDenoisingPolicy.from_env(env)
    original = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    branch = 2
    obs, _ = env.reset(options={"branch": {"latents": original.latents[:, branch], "step_index": branch}})
    assert torch.equal(obs["latent"], original.latents[:, branch])
    assert torch.equal(obs["timestep"][:, 0], original.timesteps[:, branch])
    assert env.unwrapped.prompts == original.prompts
    for step in range(branch, NUM_STEPS):
        obs, rewards, terminated, _, _ = env.step(original.latents[:, step + 1])
    assert bool(terminated.all()) and torch.equal(rewards, original.rewards)


def test_the_single_env_branches_from_numpy_latents(make_env):
    env = make_env()
    obs, _ = env.reset(seed=0)
    branched, _ = env.reset(options={"branch": {"latents": obs["latent"], "step_index": 1}})
    assert (branched["latent"] == obs["latent"]).all() and branched["timestep"][0] != obs["timestep"][0]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"noise": True}, ValueError, r"reset options \['noise'\] are not known; allowed: \['shared_noise', 'branch'\]"),
        ({"shared_noise": 1}, TypeError, r"options\['shared_noise'\]=1; allowed: True or False"),
        ({"branch": {"latents": None}}, ValueError, "allowed: a dict with the keys 'latents' and 'step_index'"),
        ({"branch": {"latents": torch.zeros(4, 3, 16, 16), "step_index": NUM_STEPS}}, ValueError, "allowed: an integer 0 <= step_index"),
        ({"branch": {"latents": torch.zeros(2, 3, 16, 16), "step_index": 1}}, ValueError, r"latents has shape \(2, 3, 16, 16\); allowed: \(4, 3, 16, 16\)"),
        ({"branch": {"latents": torch.zeros(4, 3, 16, 16), "step_index": 1}, "shared_noise": True}, ValueError, "exclude each other"),
    ],
)
def test_reset_options_say_what_they_allow(make_vec_env, options, error, message):
    env = make_vec_env(num_envs=4, samples_per_prompt=2, array_type="torch")
    env.reset(seed=0)
    with pytest.raises(error, match=message):
        env.reset(options=options)


def test_branched_groups_share_their_prefix_and_differ_after_it(make_vec_env):
    env = make_vec_env(num_envs=6, samples_per_prompt=3, array_type="torch", prompts=PROMPTS)
    policy = GaussianDenoisingPolicy.from_env(env)
    branch = 2
    trajectories = collect_trajectories(env, policy, torch.Generator().manual_seed(0), 0, shared_noise=True, branch_step=branch)
    assert trajectories.branch_step == branch and trajectories.groups.tolist() == [0, 0, 0, 1, 1, 1]
    for leader in (0, 3):
        for member in (leader + 1, leader + 2):
            assert torch.equal(trajectories.latents[member, : branch + 1], trajectories.latents[leader, : branch + 1])
            assert torch.equal(trajectories.log_probs[member, :branch], trajectories.log_probs[leader, :branch])
            assert not torch.equal(trajectories.latents[member, branch + 1], trajectories.latents[leader, branch + 1])
    assert not torch.equal(trajectories.latents[0, 0], trajectories.latents[3, 0])
    # Only the branched steps are trained on.
    assert trajectories.trained_steps(StepWindow(), policy.sampler).tolist() == list(range(branch, NUM_STEPS))
    with pytest.raises(ValueError, match="all before branch_step=2"):
        trajectories.trained_steps(StepWindow(min_sigma=float(policy.sampler.sigma[1])), policy.sampler)
    with pytest.raises(ValueError, match="allowed: shared_noise=True, or branch_step=0"):
        collect_trajectories(env, policy, branch_step=1)
    with pytest.raises(ValueError, match=r"branch_step=4 is out of range; allowed: an integer 0 <= branch_step <= 3"):
        collect_trajectories(env, policy, shared_noise=True, branch_step=NUM_STEPS)
    # Groups keep apart when batches are concatenated.
    both = Trajectories.concatenate([trajectories, trajectories])
    assert both.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


# ---------------------------------------------------------------------------- the update


@pytest.fixture
def batch(make_vec_env):
    env = make_vec_env(num_envs=4, samples_per_prompt=2, array_type="torch", prompts=PROMPTS)
    policy = GaussianDenoisingPolicy.from_env(env)
    trajectories = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0), seed=0)
    return policy, trajectories


def _update(policy, trajectories, advantages, optimizer, config, seed=0, reference=None, epoch=0):
    context = UpdateContext(config, policy, optimizer, torch.Generator().manual_seed(seed), reference=reference, epoch=epoch)
    return grpo_update(context, trajectories, advantages)


def _recording_minibatches(monkeypatch):
    seen = []
    original = Trajectories.minibatches

    def recording(self, size, generator, steps=None, samples=None):
        batches = list(original(self, size, generator, steps, samples))
        seen.append(batches)
        return iter(batches)

    monkeypatch.setattr(Trajectories, "minibatches", recording)
    return seen


def test_at_the_sampling_policy_the_loss_is_minus_the_mean_advantage_plus_beta_kl(batch):
    policy, trajectories = batch
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.01)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    advantages = torch.tensor([1.0, 2.0, 3.0, 4.0])
    config = GRPOConfig(skip_zero_spread=False, minibatch_size=64, kl_coefficient=0.5)
    figures = _update(policy, trajectories, advantages, optimizer, config, reference=reference)
    # One minibatch of every (sample, step) pair; ratio 1 up to recomputation: -mean(A) = -2.5.
    assert figures["losses/loss"] == pytest.approx(-2.5 + 0.5 * figures["losses/kl_to_reference"], rel=1e-4)
    assert figures["losses/kl_to_reference"] > 0 and figures["losses/approx_kl"] < 1e-8
    with pytest.raises(ValueError, match="needs the reference"):
        _update(policy, trajectories, advantages, optimizer, config)


def test_groups_without_reward_spread_are_left_out(batch, monkeypatch):
    policy, trajectories = batch
    seen = _recording_minibatches(monkeypatch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    half_flat = dataclasses.replace(trajectories, rewards=torch.tensor([0.5, 0.5, 0.1, 0.9]))
    advantages = grpo_advantages(half_flat, GRPOConfig())
    figures = _update(policy, half_flat, advantages, optimizer, GRPOConfig())
    assert figures["losses/trained_fraction"] == 0.5
    assert {int(s) for samples, _ in seen[-1] for s in samples} == {2, 3}
    before = [p.clone() for p in policy.parameters()]
    flat = dataclasses.replace(trajectories, rewards=torch.full((4,), 0.5))
    figures = _update(policy, flat, grpo_advantages(flat, GRPOConfig()), optimizer, GRPOConfig())
    assert figures == {"losses/trained_fraction": 0.0, "losses/passes": 0.0, "losses/grad_norm": 0.0}
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))
    # Kept in, they are trained with advantage 0.
    figures = _update(policy, half_flat, advantages, optimizer, GRPOConfig(skip_zero_spread=False))
    assert figures["losses/trained_fraction"] == 1.0


def test_each_sample_draws_its_own_fraction_of_the_windowed_steps(batch, monkeypatch):
    policy, trajectories = batch
    seen = _recording_minibatches(monkeypatch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    config = GRPOConfig(timestep_fraction=0.5, window_size=3, window_stride=1, skip_zero_spread=False)
    _update(policy, trajectories, advantages, optimizer, config, epoch=1)
    steps_of = {}
    for samples, steps in seen[-1]:
        for sample, step in zip(samples.tolist(), steps.tolist()):
            steps_of.setdefault(sample, set()).add(step)
    # The window of epoch 1 holds steps 1, 2, 3; each sample trains round(0.5 * 3) = 2 of them.
    assert set(steps_of) == {0, 1, 2, 3}
    assert all(len(steps) == 2 and steps <= {1, 2, 3} for steps in steps_of.values())
    assert len({frozenset(steps) for steps in steps_of.values()}) > 1


def test_passes_stop_early_once_the_approx_kl_exceeds_its_target(batch):
    policy, trajectories = batch
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for target_kl, passes in ((1e-30, 1), (math.inf, 3)):
        trained = copy.deepcopy(policy)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
        config = GRPOConfig(inner_epochs=3, target_kl=target_kl, minibatch_size=4, gradient_accumulation=2, skip_zero_spread=False)
        figures = _update(trained, trajectories, advantages, optimizer, config)
        assert figures["losses/passes"] == passes


def test_grpo_needs_groups_of_more_than_one_sample(make_vec_env):
    env = make_vec_env(num_envs=2, array_type="torch")
    trajectories = collect_trajectories(env, GaussianDenoisingPolicy.from_env(env), seed=0)
    with pytest.raises(ValueError, match="allowed: \\[env\\] samples_per_prompt >= 2"):
        get_algorithm("grpo").advantages(trajectories, GRPOConfig())


# ---------------------------------------------------------------------------- through the training API


def _config(env: dict, algorithm: dict) -> TrainConfig:
    return TrainConfig.from_tables({
        "run": {"epochs": 2, "device": "cpu"},
        "env": {"model": "tiny-random", "num_envs": 4, "samples_per_prompt": 2, "batches_per_epoch": 1,
                "num_inference_steps": NUM_STEPS, "prompts": "scenes_train", **env},
        "algorithm": {"name": "grpo", "minibatch_size": 8, **algorithm},
    })


@pytest.mark.parametrize(
    ("env", "algorithm"),
    [
        ({}, {}),
        ({"shared_noise": True}, {"kl_coefficient": 0.1, "inner_epochs": 2, "target_kl": 1e-30, "advantage_scale": "batch"}),
        ({"shared_noise": True, "branch_step": 2}, {"window_size": 1, "timestep_fraction": 0.5, "per_dimension_ratio": False}),
    ],
    ids=["plain", "shared-noise-kl-early-stop", "branch-window-fraction"],
)
def test_a_two_epoch_grpo_run_through_the_training_api(tmp_path, env, algorithm):
    history = train(_config(env, algorithm), tmp_path)
    assert len(history) == 2
    assert all(math.isfinite(value) for figures in history for value in figures.values())
    assert all("losses/trained_fraction" in figures for figures in history)
    if "target_kl" in algorithm:
        assert history[-1].get("losses/passes", 0.0) <= 1.0


def test_branching_settings_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="branch_step=2 needs shared_noise = true"):
        _config({"branch_step": 2}, {})
    with pytest.raises(ConfigError, match="allowed: a step before the last"):
        _config({"shared_noise": True, "branch_step": NUM_STEPS}, {})
    assert _config({}, {"advantage_scale": "batch"}).to_tables()["algorithm"]["advantage_scale"] == "batch"


def test_the_example_algorithm_module_registers_and_trains(monkeypatch, capsys):
    from agents.algorithms import unregister_algorithm

    example = Path(__file__).parent.parent / "examples" / "own_algorithm.py"
    monkeypatch.setattr(sys, "argv", ["own_algorithm.py", "--epochs", "1"])
    try:
        module = runpy.run_path(str(example), run_name="__main__")
        samples = SimpleNamespace(rewards=torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0]), groups=torch.tensor([0, 0, 0, 1, 1]))
        # 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2; 0 - 4, 4 - 0.
        assert module["leave_one_out"](samples, None).tolist() == [-3.0, -1.5, 4.5, -4.0, 4.0]
    finally:
        unregister_algorithm("rloo")
    assert "epoch 1: mean reward" in capsys.readouterr().out
