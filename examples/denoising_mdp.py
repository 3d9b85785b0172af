"""Diffusion as an MDP, step by step: what the agent sees, what it does, and how likely it was.

    python examples/denoising_mdp.py

Walks one episode of DiffusionDenoise-v0 with the model's own sampler and prints, at every step,
the timestep t, the policy's sigma_t, the size of the action's deviation from the mean, and its
exact log-likelihood log N(x_{t-1}; mu_theta(x_t, t, c), sigma_t^2 I). The sum of the per-step
log-likelihoods is the log-likelihood of the whole trajectory, the quantity DDPO's policy
gradient differentiates.
"""

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy

env = gym.make("DiffusionDenoise-v0", num_inference_steps=10)
policy = GaussianDenoisingPolicy.from_env(env)
obs, info = env.reset(seed=0)
print(f"prompt: {info['prompt']!r}; latent {obs['latent'].shape}, embedding {obs['prompt_embedding'].shape}")
print(f"{'t':>5} {'sigma_t':>9} {'|a - mu| / sigma':>17} {'log pi(a|s)':>12}")

trajectory_log_prob = 0.0
terminated = False
with torch.no_grad():
    while not terminated:
        distribution = policy.distribution(obs)
        action = distribution.sample()
        log_prob = float(policy.log_prob(obs, action))
        deviation = float((action - distribution.mean).norm() / distribution.stddev.flatten()[0])
        print(f"{int(obs['timestep'][0]):>5} {float(distribution.stddev.flatten()[0]):>9.4f} {deviation:>17.2f} {log_prob:>12.1f}")
        trajectory_log_prob += log_prob
        obs, reward, terminated, truncated, info = env.step(action[0].numpy())

print(f"trajectory log-likelihood {trajectory_log_prob:.1f}; reward {reward:.3f} ({info['reward_details']})")
