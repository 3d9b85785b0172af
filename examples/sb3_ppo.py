"""Stable-Baselines3's PPO fine-tunes the built-in diffusion model on JPEG compressibility.

    python examples/sb3_ppo.py --rollouts 160 --output-dir runs/sb3_ppo

The denoiser's Gaussian transition is SB3's action distribution (``DiffusionActorCriticPolicy``,
built from the model's registered name and the environment's number of steps); SB3 runs its own
PPO on it: N episodes of K steps per rollout (one reward query per episode,
paid at the last step; by default all N of one prompt, see ``--samples-per-prompt``), GAE with
gamma = lambda = 1 (so an advantage is the final reward minus the critic's estimate), the
clipped objective on DDPO's per-dimension ratio (clip 1e-3, as the DDPO-IS configs;
``--exact-ratio`` clips the full-likelihood ratio instead), one Adam step per rollout on the
UNet (whole, or LoRA adapters with ``--lora-rank``) and on the critic, the steps with sigma_t
below ``--min-sigma`` left out. The per-rollout mean reward is written to ``history.json`` (as
``agents.train`` names it), which ``benchmarks/learning.py --compare`` plots next to DDPO-IS per
reward query (and evaluates against the pretrained model), the UNet's trained weights to
``actor.safetensors``, the whole SB3 model to ``ppo.zip`` (``PPO.load(path, env=...)`` resumes
it) and the arguments to ``args.json``.

Measured with the defaults (docs/experiments.md, "Stable-Baselines3 PPO against DDPO-IS"): 160 rollouts in 18 minutes on a
2-core CPU take the mean JPEG size from 1.173 to 0.871 kB (-26 %) with the prompted background
kept in 88 % of the samples and the shapes gone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from safetensors.torch import save_file
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.sb3 import DiffusionActorCriticPolicy, SB3VecEnvAdapter
from diffusion_env.backends import available_models
from diffusion_env.envs import DEFAULT_MODEL


class RewardHistory(BaseCallback):
    """Records the mean final reward of each rollout's episodes, against reward queries so far."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, float]] = []
        self.episode_rewards: list[float] = []
        self.queries = 0
        self.started = time.perf_counter()

    def _on_step(self) -> bool:
        for done, reward in zip(self.locals["dones"], self.locals["rewards"]):
            if done:
                self.episode_rewards.append(float(reward))
        return True

    def _on_rollout_end(self) -> None:
        if not self.episode_rewards:
            return
        self.queries += len(self.episode_rewards)
        now = time.perf_counter()
        self.history.append(
            {
                "charts/reward_mean": float(np.mean(self.episode_rewards)),
                "charts/reward_std": float(np.std(self.episode_rewards)),
                "charts/reward_queries": float(self.queries),
                "charts/epoch_seconds": now - self.started,
            }
        )
        print(f"rollout {len(self.history)}: {self.queries} reward queries, mean reward {self.history[-1]['charts/reward_mean']:.4f}", flush=True)
        self.episode_rewards, self.started = [], now


def main() -> None:
    parser = argparse.ArgumentParser(description="SB3 PPO with the diffusion policy on DiffusionDenoise-v0")
    parser.add_argument("--rollouts", type=int, default=160, help="PPO rollouts (each: num-envs episodes)")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--num-inference-steps", type=int, default=20)
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument(
        "--samples-per-prompt", type=int, default=16,
        help="episodes of each prompt per rollout; with num-envs, every rollout is one prompt, so that SB3's "
        "per-minibatch advantage normalisation compares samples of one prompt (DDPO's per-prompt statistics)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, choices=available_models(), help="registered model name (default: the built-in model)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--lora-rank", type=int, default=0,
        help="LoRA rank; 0 (default) fine-tunes the whole UNet, as the built-in model needs (see agents/configs)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="transitions per PPO minibatch (default: the whole rollout, one optimiser step per rollout)",
    )
    parser.add_argument(
        "--min-sigma", type=float, default=0.05,
        help="steps with sigma_t below this are not trained on (as agents.train's --min-sigma)",
    )
    parser.add_argument("--n-epochs", type=int, default=1, help="PPO passes over each rollout")
    parser.add_argument("--clip-range", type=float, default=1e-3, help="PPO clip (of the per-dimension ratio by default)")
    parser.add_argument(
        "--exact-ratio", action="store_true",
        help="clip SB3's exact full-likelihood ratio instead of DDPO's per-dimension one (then use e.g. --clip-range 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where history.json, args.json and actor.safetensors go"
    )
    args = parser.parse_args()

    envs = gym.make_vec(
        "DiffusionDenoise-v0",
        num_envs=args.num_envs,
        model=args.model,
        reward=args.reward,
        num_inference_steps=args.num_inference_steps,
        autoreset_mode=AutoresetMode.SAME_STEP,
        samples_per_prompt=args.samples_per_prompt,
    )
    model = PPO(
        DiffusionActorCriticPolicy,
        SB3VecEnvAdapter(envs),
        n_steps=args.num_inference_steps,  # one episode per environment per rollout
        batch_size=args.batch_size or args.num_envs * args.num_inference_steps,
        n_epochs=args.n_epochs,
        gamma=1.0,
        gae_lambda=1.0,
        ent_coef=0.0,  # the Gaussian's entropy does not depend on the parameters
        clip_range=args.clip_range,
        learning_rate=args.learning_rate,
        max_grad_norm=1.0,
        seed=args.seed,
        device=args.device,
        policy_kwargs={
            "model": args.model,
            "num_inference_steps": args.num_inference_steps,
            "lora_rank": args.lora_rank,
            "per_dimension_ratio": not args.exact_ratio,
            "min_sigma": args.min_sigma,
        },
    )
    history = RewardHistory()
    model.learn(total_timesteps=args.rollouts * args.num_envs * args.num_inference_steps, callback=history)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "history.json").write_text(json.dumps(history.history, indent=2))
        (args.output_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        actor = model.policy.actor
        trained = {name: p.detach().cpu().contiguous() for name, p in actor.named_parameters() if p.requires_grad}
        save_file(trained, args.output_dir / "actor.safetensors")
        model.save(args.output_dir / "ppo.zip")
    first, last = history.history[0]["charts/reward_mean"], history.history[-1]["charts/reward_mean"]
    print(f"mean reward: first rollout {first:.4f}, last rollout {last:.4f}")


if __name__ == "__main__":
    main()
