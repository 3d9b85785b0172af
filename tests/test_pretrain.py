"""Pretraining machinery on a tiny UNet: steps, checkpoints, exact resumption, export and loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_env.shapes import model as builtin_model, pretrain
from diffusion_env.backends import PixelUNetDenoiser
from diffusion_env.samplers import GaussianTransition, make_sampler
from diffusion_env.samplers.flow import FlowSampler

# A 32x32 UNet of a few thousand parameters with the built-in model's kinds of conditioning
# (cross-attention and the pooled text embedding): a step takes milliseconds.
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "cross_attention_dim": builtin_model.PROMPT_HIDDEN_SIZE,
    "attention_head_dim": 8,
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-exact comparisons need the same reduction order in every run of a test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(output_dir: Path, steps: int, **changes) -> pretrain.TrainConfig:
    return pretrain.TrainConfig(
        output_dir=output_dir,
        steps=steps,
        batch_size=4,
        warmup_steps=2,
        checkpoint_every=2,
        export_dir=None,
        unet_config=dict(TINY_UNET),
        **changes,
    )


def parameters(state: pretrain.TrainState) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in state.unet.named_parameters()}


def test_steps_are_finite_and_write_a_checkpoint(tmp_path):
    before = parameters(pretrain.new_state(tiny_config(tmp_path, 2)))
    state = pretrain.train(tiny_config(tmp_path, 2), progress=False)
    assert state.step == 2 and len(state.losses) == 2
    assert all(np.isfinite(state.losses))
    after = parameters(state)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after), "training changed nothing"
    assert pretrain.latest_checkpoint(tmp_path).name == "step-0000002"
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "flow"])
def test_resume_continues_bit_for_bit(tmp_path, prediction_type):
    straight = pretrain.train(tiny_config(tmp_path / "straight", 4, prediction_type=prediction_type), progress=False)

    pretrain.train(tiny_config(tmp_path / "split", 2, prediction_type=prediction_type), progress=False)
    # A new process would start from nothing but the files: so does this call.
    resumed = pretrain.train(tiny_config(tmp_path / "split", 4, prediction_type=prediction_type), resume=True, progress=False)

    assert resumed.step == 4
    assert resumed.losses == straight.losses
    for name, value in parameters(straight).items():
        assert torch.equal(parameters(resumed)[name], value), name
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)


def test_checkpoints_are_pruned_and_their_state_needs_no_pickled_objects(tmp_path):
    from diffusion_env import checkpoints

    pretrain.train(tiny_config(tmp_path, 6), progress=False)
    root = tmp_path / "checkpoints"
    assert checkpoints.checkpoint_names(root, "step-") == ["step-0000004", "step-0000006"]
    state = torch.load(root / "step-0000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["losses"]) == 6


def test_resume_without_checkpoint_says_how_to_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        pretrain.train(tiny_config(tmp_path, 2), resume=True, progress=False)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, 2)
    state = pretrain.train(config, progress=False)
    saved = parameters(state)

    sampler = make_sampler(builtin_model.make_scheduler(), num_inference_steps=20)
    pretrain.train_step(state, config, sampler, builtin_model.make_prompt_encoder())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    # The UNet and EMA files are written; the process dies while writing the last file.
    monkeypatch.setattr(pretrain.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.save_checkpoint(state, config)
    monkeypatch.undo()

    _, restored = pretrain.load_checkpoint(tmp_path)
    assert restored.step == 2
    for name, value in saved.items():
        assert torch.equal(parameters(restored)[name], value), name
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("prediction_type", "scheduler_class", "sampler_class"),
    [("v_prediction", DDIMScheduler, GaussianTransition), ("flow", FlowMatchEulerDiscreteScheduler, FlowSampler)],
)
def test_exported_ema_round_trips_through_load_builtin_denoiser(tmp_path, prediction_type, scheduler_class, sampler_class):
    config = dataclasses.replace(
        tiny_config(tmp_path / "run", 2, prediction_type=prediction_type), export_dir=tmp_path / "weights"
    )
    state = pretrain.train(config, progress=False)
    assert (tmp_path / "weights" / "diffusion_pytorch_model.safetensors").is_file()

    denoiser = builtin_model.load_builtin_denoiser(tmp_path / "weights")
    assert isinstance(denoiser, PixelUNetDenoiser)
    # The scheduler it was trained with, and so the environment's default sampler of that objective.
    assert type(denoiser.scheduler) is scheduler_class
    assert isinstance(make_sampler(denoiser.scheduler, num_inference_steps=4), sampler_class)
    assert denoiser.default_guidance_scale == builtin_model.DEFAULT_GUIDANCE_SCALE
    expected = pretrain.ema_unet(state).state_dict()
    for name, value in denoiser.unet.state_dict().items():
        assert torch.equal(value, expected[name]), name

    agreement, images = pretrain.evaluate(denoiser, pretrain.evaluation_prompts(2), guidance_scale=3.0)
    assert set(agreement) >= {"background", "color", "shape"}
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_flow_weights_are_never_exported_over_the_shipped_ddpm_ones(tmp_path):
    with pytest.raises(ValueError, match="another objective"):
        config = dataclasses.replace(tiny_config(tmp_path, 2, prediction_type="flow"), export_dir=builtin_model.WEIGHTS_DIR)
        pretrain.train(config, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    args = pretrain.build_parser().parse_args(["--prediction-type", "flow"])
    assert pretrain.config_from_args(args).export_dir == builtin_model.FLOW_WEIGHTS_DIR


def test_flow_objective_regresses_the_velocity_of_the_straight_path(tmp_path):
    # The flow objective's inputs and targets, from the sampler it trains with: x_t on the line
    # from x0 (t = 0) to eps (t = 1), and v = eps - x0, checked against the definitions.
    sampler = make_sampler(builtin_model.make_scheduler("flow"), num_inference_steps=20)
    clean, noise = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 3, 32, 32)
    timesteps = sampler.training_timesteps(3, torch.Generator().manual_seed(0))
    t = (timesteps / 1000).float().view(3, 1, 1, 1)
    assert bool(((timesteps >= 0) & (timesteps < 1000)).all())
    torch.testing.assert_close(sampler.noisy_latents(clean, noise, timesteps), (1 - t) * clean + t * noise)
    torch.testing.assert_close(sampler.regression_target(clean, noise, timesteps), noise - clean)
    state = pretrain.train(tiny_config(tmp_path, 2, prediction_type="flow"), progress=False)
    assert all(np.isfinite(state.losses))


def test_missing_weights_say_how_to_produce_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion_env.shapes.pretrain"):
        builtin_model.load_builtin_denoiser(tmp_path)


def test_builtin_scheduler_keeps_every_step_stochastic():
    transition = GaussianTransition(builtin_model.make_scheduler(), num_inference_steps=20, eta=1.0)
    assert bool((transition.sigma > 0).all())


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--batch-size", "--lr", "--resume", "--cfg-dropout", "--threads", "--evaluate"):
        assert option in text
