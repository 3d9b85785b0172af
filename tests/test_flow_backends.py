"""Stable Diffusion 3 and FLUX.1 as environments: test-sized pipelines built offline, loaded by
folder, sampled exactly as diffusers samples them, with exact flow-SDE log-likelihoods, and
trained by the agents with LoRA on the transformers' attention."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, FluxPipeline, UNet2DModel

from agents import GaussianDenoisingPolicy, batch_normalized_advantages, collect_trajectories
from agents.algorithms import UpdateContext, get_algorithm
from diffusion_env.backends import FluxBackend, StableDiffusion3Backend, make_denoiser, registered_name
from diffusion_env.backends.tiny_flow_pipelines import T5_WIDTH, tiny_flux, tiny_sd3
from diffusion_env.samplers import FlowSampler, ScheduleError, make_sampler

STEPS = 3
PROMPT = "a red cat, 2 dogs"
#: Short T5 sequences keep the tiny transformers' attention small.
TOKENS = 16
FAMILIES = {"sd3": (tiny_sd3, StableDiffusion3Backend), "flux": (tiny_flux, FluxBackend)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny pipeline saved as a diffusers folder."""
    saved = {}
    for family, (build, _) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(family)
        build(folder / "build").save_pretrained(folder / "pipeline")
        saved[family] = folder / "pipeline"
    return saved


def make_env(folder, **kwargs):
    kwargs.setdefault("model_options", {})["max_sequence_length"] = TOKENS
    return gym.make("DiffusionDenoise-v0", model=str(folder), prompts=[PROMPT], num_inference_steps=STEPS,
                    height=16, width=16, **kwargs)


def pipeline_latents(folder, start, **call):
    """The pipeline's own sampling from ``start`` ``(1, C, H, W)``: its final latents, unpacked."""
    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    flux = isinstance(pipeline, FluxPipeline)
    # FLUX's pipeline takes and returns packed latents; packed here with its own helper.
    latents = FluxPipeline._pack_latents(start, 1, start.shape[1], 8, 8) if flux else start
    with torch.no_grad():
        output = pipeline(PROMPT, height=16, width=16, num_inference_steps=STEPS, latents=latents, output_type="latent",
                          max_sequence_length=TOKENS, **call).images
        image = pipeline(PROMPT, height=16, width=16, num_inference_steps=STEPS, latents=latents, output_type="np",
                         max_sequence_length=TOKENS, **call).images
    return (FluxPipeline._unpack_latents(output, 16, 16, pipeline.vae_scale_factor) if flux else output), image[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_folder_is_an_environment_observing_its_latent_and_text_embeddings(folders, family):
    env = make_env(folders[family])
    backend = env.unwrapped.backend
    assert isinstance(backend, FAMILIES[family][1]) and registered_name(backend) == str(folders[family])
    assert isinstance(env.unwrapped.sampler, FlowSampler)
    assert set(env.observation_space.spaces) == {"latent", "timestep", "prompt_embedding", "pooled_prompt_embedding"}
    assert env.observation_space["latent"].shape == (4, 8, 8)  # FLUX's too: unpacked
    text_tokens = 77 + TOKENS if family == "sd3" else TOKENS  # SD3: CLIP's 77, then T5's
    assert env.observation_space["prompt_embedding"].shape == (text_tokens, T5_WIDTH)
    assert env.observation_space["pooled_prompt_embedding"].shape == ((64,) if family == "sd3" else (32,))
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_an_sd3_folder_saved_without_t5_loads_with_zeros_for_its_token_states(tmp_path):
    pipeline = tiny_sd3(tmp_path / "build")
    pipeline.text_encoder_3 = pipeline.tokenizer_3 = None
    pipeline.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipeline.save_pretrained(tmp_path / "pipeline")
    env = make_env(tmp_path / "pipeline")
    assert env.unwrapped.backend.pipeline.text_encoder_3 is None
    obs, _ = env.reset(seed=0)
    # The CLIP states first, then the T5 tokens the transformer still sees: zeros, as the pipeline fills them.
    assert np.abs(obs["prompt_embedding"][:77]).sum() > 0 and not obs["prompt_embedding"][77:].any()
    assert obs["prompt_embedding"].shape == (77 + TOKENS, T5_WIDTH)


@pytest.mark.parametrize(
    ("family", "options", "call"),
    [
        ("sd3", {"guidance_scale": 3.0, "negative_prompt": "blurry"}, {"guidance_scale": 3.0, "negative_prompt": "blurry"}),
        ("flux", {"guidance_scale": 3.0}, {"guidance_scale": 3.0}),
        ("flux", {"guidance_scale": 2.0, "negative_prompt": "blurry", "model_options": {"true_cfg_scale": 4.0}},
         {"guidance_scale": 2.0, "negative_prompt": "blurry", "true_cfg_scale": 4.0}),
    ],
    ids=["sd3-cfg", "flux-guidance-embedding", "flux-true-cfg"],
)
def test_without_noise_the_policy_through_the_env_reproduces_the_pipelines_own_sampling(folders, family, options, call):
    env = make_env(folders[family], sampler_options={"noise_level": 0.0}, **options)
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    start = torch.as_tensor(obs["latent"])[None]
    for _ in range(STEPS):
        obs, _, terminated, _, info = env.step(policy.predict(obs))
    assert terminated
    expected, image = pipeline_latents(folders[family], start, **call)
    torch.testing.assert_close(torch.as_tensor(obs["latent"])[None], expected, rtol=1e-5, atol=1e-5)
    # The last step's image is the VAE's decoding of the final latents, as the pipeline decodes them.
    assert np.abs(info["image"].astype(int) - np.round(image * 255).astype(int)).max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("noise", ["flow_grpo", "cps"])
def test_stochastic_steps_have_the_exact_gaussian_log_likelihood(folders, family, noise):
    env = make_env(folders[family], guidance_scale=2.0, sampler_options={"noise": noise, "noise_level": 0.7})
    sampler = env.unwrapped.sampler
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    noises = torch.randn((STEPS, 1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    for k, noise_sample in enumerate(noises):
        with torch.no_grad():
            action, log_prob = policy.sample_with_log_prob(obs, noise=noise_sample)
            mean = policy.mean(obs)
        std = policy.std(obs).double()
        t, t_next = float(sampler.t[k]), float(sampler.t_next[k])
        if noise == "flow_grpo" and t < 1:  # Flow-GRPO Eq. 9's noise: a sqrt(t / (1 - t)) sqrt(|dt|)
            assert float(std) == pytest.approx(0.7 * math.sqrt(t / (1 - t)) * math.sqrt(t - t_next), rel=1e-6)
        if float(std) == 0:  # CPS's last step, to t = 0: deterministic
            assert float(log_prob) == 0.0 and torch.equal(action, mean)
        else:
            expected = torch.distributions.Normal(mean.double(), std.reshape(-1, 1, 1, 1)).log_prob(action.double())
            torch.testing.assert_close(log_prob.double(), expected.sum(dim=(1, 2, 3)), rtol=1e-6, atol=1e-4)
        obs, *_ = env.step(action[0].numpy())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ["ddpo-is", "grpo"])
def test_the_agents_train_the_transformers_lora_adapters(folders, family, algorithm):
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=4, samples_per_prompt=2, model=str(folders[family]),
                        prompts=[PROMPT, "two green squares"], num_inference_steps=2, height=16, width=16, guidance_scale=2.0,
                        array_type="torch", sampler_options={"noise": "flow_grpo", "noise_level": 0.7},
                        model_options={"max_sequence_length": TOKENS})
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    adapters = policy.add_lora(2, seed=0)
    before = {name: parameter.detach().clone() for name, parameter in adapters.items()}
    chosen = get_algorithm(algorithm)
    config = chosen.config_class(minibatch_size=2, **chosen.fixed)
    context = UpdateContext(config, policy, torch.optim.AdamW(adapters.values(), lr=1e-2), torch.Generator().manual_seed(0))
    for epoch in range(2):
        trajectories = collect_trajectories(envs, policy, seed=epoch)
        advantages = (chosen.advantages(trajectories, config) if chosen.advantages
                      else batch_normalized_advantages(trajectories.rewards))
        figures = chosen.update(context, trajectories, advantages)
        assert figures and all(math.isfinite(value) for value in figures.values())
    assert any(not torch.equal(before[name], parameter) for name, parameter in adapters.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_transformers_train_float32_lora_on_both_attention_streams(family):
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=2, model=f"tiny-{family}", prompts=[PROMPT], num_inference_steps=2,
                        dtype=torch.bfloat16, array_type="torch", sampler_options={"noise_level": 0.7},
                        model_options={"gradient_checkpointing": True, "frozen_dtype": torch.bfloat16, "max_sequence_length": TOKENS})
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    adapters = policy.add_lora(2, seed=0)
    backend = envs.unwrapped.backend
    assert backend.dtype == torch.bfloat16 and next(backend.text_encoder.parameters()).dtype == torch.bfloat16
    assert backend.transformer.is_gradient_checkpointing
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    # The image stream's projections and the text stream's.
    assert any(".to_q.lora_A" in name for name in adapters) and any(".add_q_proj.lora_A" in name for name in adapters)
    trajectories = collect_trajectories(envs, policy, seed=0)
    steps = torch.tensor([0, 1])
    loss = policy.log_prob(trajectories.observations(steps, steps), trajectories.actions(steps, steps)).sum()
    loss.backward()
    gradients = [p.grad for p in adapters.values() if p.grad is not None]
    assert gradients and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in gradients)
    assert any(bool(g.abs().sum() > 0) for g in gradients)


def test_bad_sizes_options_and_pipelines_are_refused_with_what_is_allowed(folders):
    sd3 = DiffusionPipeline.from_pretrained(folders["sd3"])
    with pytest.raises(ValueError, match=r"height=18; allowed: a positive multiple of 4 \(the VAE's scale factor 2 times "
                                         r"the transformer's patch size 2\)"):
        make_denoiser(sd3, height=18)
    with pytest.raises(ValueError, match=r"width=68; allowed: at most 64, the transformer's position embedding's extent"):
        make_denoiser(sd3, width=68)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['channels_last'\]; allowed: \['height', 'width'"):
        make_denoiser(sd3, channels_last=True)
    flux = DiffusionPipeline.from_pretrained(folders["flux"])
    with pytest.raises(ValueError, match=r"width=6; allowed: a positive multiple of 4 \(the VAE's scale factor 2 times the packing's patch size 2\)"):
        make_denoiser(flux, height=16, width=6)
    with pytest.raises(ValueError, match=r"true_cfg_scale=0.5 is out of range; allowed: 1 <= true_cfg_scale"):
        make_denoiser(flux, height=16, width=16, true_cfg_scale=0.5)
    with pytest.raises(ScheduleError, match=r"2 sigmas for num_inference_steps=3; allowed: one per step"):
        make_sampler(flux.scheduler, 3, mu=0.5, sigmas=[1.0, 0.5])
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(TypeError, match=r"no back-end for a DDPMPipeline; allowed: \[.*'FluxPipeline'.*'StableDiffusion3Pipeline'"):
        make_denoiser(DDPMPipeline(unet, flux.scheduler))
