"""A flow-matching model (Stable Diffusion 3 or FLUX.1) as an MDP: one episode of its flow SDE.

    python examples/flow_model.py [--model tiny-sd3 | tiny-flux | sd3.5-medium | flux-dev] [--noise cps]

Runs one episode of DiffusionDenoise-v0 on a flow-matching model with a stochastic flow sampler
(Flow-GRPO's SDE by default) and prints, at every step, the timestep, the step's sigma and the
exact log-likelihood of the action the policy took; steps without noise (CPS's last, or steps
outside the SDE window) are deterministic and have none. The default model is the test-sized
``tiny-sd3``, built offline; a real checkpoint needs its pipeline in the Hugging Face cache and a GPU.
"""

import argparse

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="tiny-sd3", help="a registered flow-matching model, hub id or pipeline folder")
parser.add_argument("--noise", default="flow_grpo", choices=["flow_grpo", "dance", "cps"], help="the flow SDE")
parser.add_argument("--noise-level", type=float, default=0.7)
parser.add_argument("--num-inference-steps", type=int, default=6)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

env = gym.make("DiffusionDenoise-v0", model=args.model, prompts=["a red cat, 2 dogs"], reward="jpeg_compressibility",
               num_inference_steps=args.num_inference_steps, device=args.device,
               sampler_options={"noise": args.noise, "noise_level": args.noise_level})
policy = GaussianDenoisingPolicy.from_env(env, seed=0)
obs, info = env.reset(seed=0)
conditioning = {key: obs[key].shape for key in env.unwrapped.backend.conditioning_shapes}
print(f"prompt {info['prompt']!r}: latent {obs['latent'].shape}, conditioning {conditioning}")
print(f"{'t':>8} {'sigma':>8} {'log pi(a|s)':>12}")

trajectory_log_prob = 0.0
terminated = False
with torch.no_grad():
    while not terminated:
        action, log_prob = policy.sample_with_log_prob(obs)
        sigma = float(policy.std(obs))
        shown = f"{float(log_prob):>12.1f}" if sigma > 0 else f"{'(none)':>12}"
        print(f"{float(obs['timestep'][0]):>8.2f} {sigma:>8.4f} {shown}")
        trajectory_log_prob += float(log_prob)
        obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())

print(f"trajectory log-likelihood {trajectory_log_prob:.1f}; reward {reward:.3f}")
