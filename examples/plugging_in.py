"""Plugging in a sampler, a model and a prompt set, without touching the library.

    python examples/plugging_in.py --window 0 6

Registers three things by name, then uses them as any built-in one:

- a sampler: DDIM that is stochastic (eta = 1) only on a window of steps and deterministic
  (an ODE step, eta = 0) elsewhere, as MixGRPO mixes SDE and ODE steps. The deterministic steps
  have no log-likelihood (0 here) and agents do not train on them;
- a model: the library's own pixel UNet class with other weights (any ``DenoiserBackend``);
- a prompt set: prompts read from a text file, one a line.

It prints, for each step, the timestep, sigma_t and the action's exact log-likelihood.
"""

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import torch

import diffusion_env
from agents import GaussianDenoisingPolicy
from diffusion_env.backends import tiny_random_denoiser
from diffusion_env.samplers import GaussianTransition


class WindowedDDIM(GaussianTransition):
    """DDIM (Song et al., 2021) with ``eta`` inside ``window = (start, stop)`` and eta = 0 elsewhere."""

    def __init__(self, scheduler, num_inference_steps, device="cpu", eta=1.0, window=(0, 4)):
        super().__init__(scheduler, num_inference_steps, eta=eta, device=device)
        steps = torch.arange(num_inference_steps, device=self.coef_eps.device)
        inside = (steps >= window[0]) & (steps < window[1])
        alpha_prev = self.coef_x0**2  # coef_x0 = sqrt(alpha_(t-1))
        # DDIM eq. (12) with sigma_t = 0: the direction towards x_t takes all of 1 - alpha_(t-1).
        self.coef_eps = torch.where(inside, self.coef_eps, (1.0 - alpha_prev).sqrt())
        self._set_tables(self.timesteps, self.sigma, inside, device)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--window", type=int, nargs=2, default=(0, 6), metavar=("START", "STOP"))
parser.add_argument("--num-inference-steps", type=int, default=10)
parser.add_argument("--model", default="shapes32", help="shapes32 (the built-in model) or my-tiny (registered here)")
args = parser.parse_args()

diffusion_env.register_sampler("windowed-ddim", WindowedDDIM, overwrite=True)
diffusion_env.register_model("my-tiny", lambda: tiny_random_denoiser(sample_size=32, seed=3), overwrite=True)
with tempfile.TemporaryDirectory() as folder:
    prompt_file = Path(folder) / "prompts.txt"
    prompt_file.write_text("# one prompt a line\na red circle on a blue background\ntwo small green squares on a white background\n")
    diffusion_env.register_prompt_set("my-prompts", lambda: diffusion_env.PromptSet.from_file(prompt_file), overwrite=True)

    env = gym.make(
        "DiffusionDenoise-v0",
        model=args.model,
        prompts="my-prompts",
        num_inference_steps=args.num_inference_steps,
        sampler="windowed-ddim",
        sampler_options={"window": tuple(args.window)},
    )
    policy = GaussianDenoisingPolicy.from_env(env, seed=0)
    obs, info = env.reset(seed=0)

print(f"prompt {info['prompt']!r}; stochastic steps: {env.unwrapped.sampler.stochastic.nonzero().flatten().tolist()}")
print(f"{'t':>5} {'sigma_t':>9} {'log pi(a|s)':>12}")
terminated = False
with torch.no_grad():
    while not terminated:
        action, log_prob = policy.sample_with_log_prob(obs)
        sigma = float(policy.std(obs)[0])
        print(f"{int(obs['timestep'][0]):>5} {sigma:>9.4f} {float(log_prob[0]):>12.1f}")
        obs, reward, terminated, truncated, info = env.step(action[0].numpy())
print(f"reward {reward:.3f}")
