"""The seams: samplers and back-ends plug in from outside the project, and imports run one way.

Everything a plug-in needs is defined in this file; no project file knows about it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from agents import (
    DDPOConfig,
    GaussianDenoisingPolicy,
    StepWindow,
    batch_normalized_advantages,
    collect_trajectories,
    ddpo_update,
    make_reference,
)
from diffusion_env import GaussianSampler, ScheduleError, register_sampler
from diffusion_env.backends import PROMPT_EMBEDDING, PixelUNetDenoiser, tiny_random_denoiser
from tests.conftest import NUM_STEPS

ROOT = Path(__file__).resolve().parent.parent


class WindowedDDIM(GaussianSampler):
    """DDIM (Song et al., 2021) with eta = 1 on the steps of a window and eta = 0 (an ODE step) elsewhere.

    Written here from the DDIM equations, independently of the project's DDIM sampler.
    """

    def __init__(self, scheduler, num_inference_steps, device="cpu", window=(0, 2)):
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps.to(torch.long)
        alphas = self.scheduler.alphas_cumprod.to(torch.float64)
        stride = self.scheduler.config.num_train_timesteps // num_inference_steps
        previous = timesteps - stride
        alpha_t = alphas[timesteps]
        alpha_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], self.scheduler.final_alpha_cumprod.double())
        stochastic = torch.zeros(num_inference_steps, dtype=torch.bool)
        stochastic[window[0] : window[1]] = True
        posterior = ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
        sigma = torch.where(stochastic, posterior, torch.zeros_like(posterior))
        self.alpha_t, self.alpha_prev, self.direction = alpha_t, alpha_prev, (1 - alpha_prev - sigma**2).sqrt()
        self._set_tables(timesteps, sigma, stochastic, device)
        self.max_timestep = float(self.scheduler.config.num_train_timesteps - 1)

    def _x0_eps(self, latents, output, step_index):
        alpha_t = self._per_sample(self.alpha_t, step_index, latents)
        x0 = (latents - (1 - alpha_t).sqrt() * output) / alpha_t.sqrt()  # epsilon prediction
        return x0.clamp(-1, 1), output

    def mean(self, latents, output, step_index):
        x0, eps = self._x0_eps(latents, output, step_index)
        return self._per_sample(self.alpha_prev, step_index, latents).sqrt() * x0 + self._per_sample(
            self.direction, step_index, latents
        ) * eps

    def predicted_clean(self, latents, output, step_index):
        return self._x0_eps(latents, output, step_index)[0]

    def training_timesteps(self, count, generator):
        return torch.randint(self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def noisy_latents(self, clean, noise, timesteps):
        return self.scheduler.add_noise(clean, noise, timesteps)

    def regression_target(self, clean, noise, timesteps):
        return noise


def test_a_sampler_defined_here_plugs_into_gym_make_with_deterministic_steps_outside_its_window():
    register_sampler("test-windowed-ddim", WindowedDDIM, overwrite=True)
    env = gym.make(
        "DiffusionDenoise-v0", model="tiny-random", prompts=["a red circle"], num_inference_steps=NUM_STEPS,
        sampler="test-windowed-ddim", sampler_options={"window": (1, 3)},
    )
    sampler = env.unwrapped.sampler
    assert isinstance(sampler, WindowedDDIM) and sampler.stochastic.tolist() == [False, True, True, False]
    policy = GaussianDenoisingPolicy.from_env(env, seed=0)
    obs, _ = env.reset(seed=0)
    reference = DDIMScheduler.from_config(env.unwrapped.backend.scheduler.config)
    reference.set_timesteps(NUM_STEPS)
    for k in range(NUM_STEPS):
        observation = {key: torch.as_tensor(value)[None] for key, value in obs.items()}
        with torch.no_grad():
            action, log_prob = policy.sample_with_log_prob(observation)
            output = env.unwrapped.backend.predict(
                observation["latent"], reference.timesteps[k : k + 1], {PROMPT_EMBEDDING: observation[PROMPT_EMBEDDING]}, 1.0
            )
            mean = policy.mean(observation)
        if sampler.stochastic[k]:
            sigma = float(sampler.sigma[k])
            expected = torch.distributions.Normal(mean.double(), sigma).log_prob(action.double()).sum()
            torch.testing.assert_close(log_prob.double()[0], expected, rtol=1e-6, atol=1e-3)
        else:
            # An ODE step: DDIM with eta = 0, exactly diffusers' step; no log-likelihood.
            ddim = reference.step(output, reference.timesteps[k], observation["latent"], eta=0.0).prev_sample
            torch.testing.assert_close(action, ddim, rtol=1e-5, atol=1e-6)
            assert float(log_prob[0]) == 0.0
        obs, *_ = env.step(action[0].numpy())


def test_a_sampler_defined_here_trains_one_ddpo_step_on_its_stochastic_steps_only():
    envs = gym.make_vec(
        "DiffusionDenoise-v0", num_envs=4, samples_per_prompt=2, model="tiny-random", prompts=["a red circle", "two squares"],
        num_inference_steps=NUM_STEPS, sampler=WindowedDDIM, sampler_options={"window": (1, 3)}, array_type="torch",
    )
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    trainable = policy.add_lora(2, seed=0)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    trajectories = collect_trajectories(envs, policy, seed=0)
    assert trajectories.log_probs[:, [0, 3]].abs().sum() == 0 and bool((trajectories.log_probs[:, 1:3] != 0).all())
    assert StepWindow().steps(envs.unwrapped.sampler).tolist() == [1, 2]  # deterministic steps are never trained on
    advantages = batch_normalized_advantages(trajectories.rewards)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    config = DDPOConfig(minibatch_size=4, gradient_accumulation=2, kl_coefficient=1e-3)  # one optimiser step
    figures = ddpo_update(policy, trajectories, advantages, optimizer, config, torch.Generator().manual_seed(0), make_reference(policy))
    assert all(np.isfinite(value) for value in figures.values()) and figures["losses/kl_to_reference"] == 0.0
    assert any(not torch.equal(before[name], p) for name, p in trainable.items())


def test_a_stochastic_step_with_zero_sigma_is_refused():
    class Broken(WindowedDDIM):
        def __init__(self, scheduler, num_inference_steps, device="cpu"):
            super().__init__(scheduler, num_inference_steps, device, window=(0, 1))
            self._set_tables(self.timesteps, torch.zeros(num_inference_steps, dtype=torch.float64), torch.ones(num_inference_steps, dtype=torch.bool), device)

    with pytest.raises(ScheduleError, match="step 0 is meant to be stochastic but sigma = 0"):
        gym.make("DiffusionDenoise-v0", model="tiny-random", num_inference_steps=NUM_STEPS, sampler=Broken)


class PooledPromptDenoiser(PixelUNetDenoiser):
    """The tiny model with a second conditioning entry, as SDXL's pooled text embedding: the
    prompt's mean token state, added to the network's output through a fixed projection."""

    def __init__(self):
        tiny = tiny_random_denoiser()
        super().__init__(tiny.unet, tiny.scheduler, tiny.prompt_encoder)
        hidden = self.prompt_encoder.hidden_size
        self.conditioning_shapes = {**self.conditioning_shapes, "pooled_prompt": (hidden,)}
        self.projection = torch.nn.Linear(hidden, 3, bias=False)
        torch.nn.init.constant_(self.projection.weight, 0.01)

    def encode_prompts(self, prompts):
        embeddings = super().encode_prompts(prompts)
        return {**embeddings, "pooled_prompt": embeddings[PROMPT_EMBEDDING].mean(dim=1)}

    def predict(self, latents, timesteps, conditioning, guidance_scale):
        output = super().predict(latents, timesteps, conditioning, guidance_scale)
        return output + self.projection(conditioning["pooled_prompt"].to(self.dtype))[:, :, None, None]


def test_a_back_end_declares_extra_conditioning_entries_that_observations_and_trajectories_carry():
    envs = gym.make_vec(
        "DiffusionDenoise-v0", num_envs=2, model=PooledPromptDenoiser(), prompts=["a red circle", "two squares"],
        num_inference_steps=NUM_STEPS, array_type="torch",
    )
    assert set(envs.single_observation_space.spaces) == {"latent", "timestep", PROMPT_EMBEDDING, "pooled_prompt"}
    assert envs.single_observation_space["pooled_prompt"].shape == (384,)
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    trajectories = collect_trajectories(envs, policy, seed=0)
    assert trajectories.conditioning["pooled_prompt"].shape == (2, 384)
    obs = trajectories.observations(torch.tensor([0, 1]), torch.tensor([0, 2]))
    with torch.no_grad():
        recomputed = policy.log_prob(obs, trajectories.actions(torch.tensor([0, 1]), torch.tensor([0, 2])))
    torch.testing.assert_close(recomputed, trajectories.log_probs[[0, 1], [0, 2]])
    without = {key: value for key, value in obs.items() if key != "pooled_prompt"}
    with pytest.raises(KeyError, match="pooled_prompt"):
        policy.mean(without)


# ---------------------------------------------------------------------------- one direction


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_of_diffusion_env_imports_agents():
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path) if name.split(".")[0] == "agents")
        for path in python_files("diffusion_env")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    # And at run time: importing every module of the package loads nothing of agents.
    modules = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for path in python_files("diffusion_env")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'agents'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize("folder", ["agents", "benchmarks", "examples"])
def test_agents_benchmarks_and_examples_use_no_private_name_of_diffusion_env(folder):
    offenders = []
    for path in python_files(folder):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion_env"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                offenders += [f"{path.name}: {node.module}" for part in node.module.split(".") if part.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr == "core":
                offenders.append(f"{path.name}:{node.lineno}: .core")
    assert offenders == []


def test_the_numpy_observation_keys_follow_the_declared_conditioning():
    env = gym.make("DiffusionDenoise-v0", model=PooledPromptDenoiser(), prompts=["a red circle"], num_inference_steps=2)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    np.testing.assert_allclose(obs["pooled_prompt"], obs[PROMPT_EMBEDDING].mean(axis=0), rtol=1e-6, atol=1e-6)


class QuarterStepDDIM(WindowedDDIM):
    """The windowed DDIM above, with the network conditioned on non-integer timesteps t + 0.25, as
    flow-matching schedulers condition on float sigmas: nothing may round them."""

    def __init__(self, scheduler, num_inference_steps, device="cpu"):
        super().__init__(scheduler, num_inference_steps, device, window=(0, num_inference_steps))
        self._set_tables(self.timesteps.to(torch.float64) + 0.25, self.sigma, self.stochastic, device)


def test_float_timesteps_reach_the_network_and_the_trajectories_unrounded():
    envs = gym.make_vec(
        "DiffusionDenoise-v0", num_envs=2, model="tiny-random", prompts=["a red circle"], num_inference_steps=NUM_STEPS,
        sampler=QuarterStepDDIM, array_type="torch",
    )
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    trajectories = collect_trajectories(envs, policy, seed=0)
    assert torch.all(trajectories.timesteps.frac() == 0.25)
    seen = []
    predict = envs.unwrapped.backend.predict
    envs.unwrapped.backend.predict = lambda latents, timesteps, *rest: seen.append(timesteps) or predict(latents, timesteps, *rest)
    samples, steps = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        recomputed = policy.log_prob(trajectories.observations(samples, steps), trajectories.actions(samples, steps))
    torch.testing.assert_close(recomputed, trajectories.log_probs[samples, steps])
    assert torch.all(seen[0].frac() == 0.25)
