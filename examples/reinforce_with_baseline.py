"""A user-written algorithm on the environment: REINFORCE with a moving-average baseline.

    python examples/reinforce_with_baseline.py --epochs 5

Uses nothing but the Gymnasium vector environment and the policy's exact ``log_prob``:

    grad J = E[ (R - b) sum_t grad log pi_theta(a_t | s_t) ],   b = running mean of R.

Any algorithm that needs an action's log-likelihood plugs in the same way.
"""

import argparse

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy

parser = argparse.ArgumentParser(description="REINFORCE with a baseline on DiffusionDenoise-v0")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--num-envs", type=int, default=8)
parser.add_argument("--num-inference-steps", type=int, default=10)
parser.add_argument("--model", default=None, help="registered model name (default: the env's)")
args = parser.parse_args()

model_kwargs = {} if args.model is None else {"model": args.model}
envs = gym.make_vec("DiffusionDenoise-v0", num_envs=args.num_envs, num_inference_steps=args.num_inference_steps,
                    reward="jpeg_compressibility", array_type="torch", **model_kwargs)
policy = GaussianDenoisingPolicy.from_env(envs)
optimizer = torch.optim.Adam(policy.backend.trainable_module().parameters(), lr=1e-5)
baseline = None

for epoch in range(args.epochs):
    obs, _ = envs.reset(seed=epoch)
    steps, terminated = [], torch.zeros(1, dtype=torch.bool)
    while not bool(terminated.all()):
        with torch.no_grad():
            action = policy.sample(obs)
        steps.append((obs, action))
        obs, rewards, terminated, _, _ = envs.step(action)

    baseline = rewards.mean() if baseline is None else 0.9 * baseline + 0.1 * rewards.mean()
    optimizer.zero_grad()
    for step_obs, action in steps:  # one backward per step keeps memory at one step's graph
        loss = -((rewards - baseline) * policy.log_prob(step_obs, action)).mean() / len(steps)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    print(f"epoch {epoch}: mean reward {rewards.mean():.4f} (baseline {baseline:.4f})")
