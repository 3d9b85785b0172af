"""The training command line: config files and flags, --help, one-line errors, --resume and --overwrite."""

import json

import pytest
import torch

from agents.train import main, parse_args

TINY_FLAGS = ["--model", "tiny-random", "--num-envs", "2", "--samples-per-prompt", "2", "--batches-per-epoch", "1",
              "--num-inference-steps", "2", "--minibatch-size", "2", "--device", "cpu", "--tracker-min-count", "2"]


def error_of(argv, capsys) -> str:
    """The one-line error a command line exits with (status 2, argparse's convention)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:"), lines  # usage line, then the error
    return lines[1]


def test_config_file_tables_and_flags(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('[run]\nepochs = 3\n[advantages]\nper_prompt = false\n[algorithm]\nname = "rwr"\nbeta = 2\n')
    config, output_dir, resume, overwrite = parse_args(
        ["--config", str(config_file), "--output-dir", str(tmp_path / "out"), "--epochs", "5", "--guidance-scale", "2.5",
         "--rwr-weighting", "sparse"]
    )
    assert (config.run.epochs, config.advantages.per_prompt, config.env.guidance_scale) == (5, False, 2.5)
    assert config.algorithm.name == "rwr" and config.algorithm.config.beta == 2.0
    assert config.algorithm.config.weighting == "sparse"
    assert output_dir == tmp_path / "out" and not resume and not overwrite
    json.dumps(config.to_tables())  # the saved config is plain JSON


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[run]\nepochs = "two"\n', "[run] epochs = 'two': allowed: an integer"),
        ("[run]\nepoch = 2\n", "[run] unknown key 'epoch'; allowed: epochs, seed"),
        ("[training]\nepochs = 2\n", "unknown table [training]; allowed: [run], [env]"),
        ('algorithm = "rwr"\nepochs = 3\n', "top-level keys ['algorithm', 'epochs'] are not in a table"),
        ('[algorithm]\nname = "rwr"\nclip_range = 0.1\n', "'clip_range' is no setting of algorithm 'rwr'; allowed: name, weighting"),
        ("[run]\nepochs = 0\n", "[run] epochs=0; allowed: an integer >= 1"),
        ("[run\n", "is not valid TOML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, expected):
    config_file = tmp_path / "bad.toml"
    config_file.write_text(text)
    message = error_of(["--config", str(config_file), "--output-dir", str(tmp_path / "out")], capsys)
    assert str(config_file) in message and expected in message
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_a_one_line_error(tmp_path, capsys):
    message = error_of(["--config", str(tmp_path / "nope.toml"), "--output-dir", str(tmp_path / "out")], capsys)
    assert "nope.toml' does not exist" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is unavailable")
def test_a_device_this_machine_lacks_is_a_one_line_error_and_creates_nothing(tmp_path, capsys):
    message = error_of([*TINY_FLAGS, "--device", "cuda", "--output-dir", str(tmp_path / "out")], capsys)
    assert "device='cuda': no CUDA device" in message and "allowed: ['cpu'" in message
    assert not (tmp_path / "out").exists()


def test_an_unknown_reward_fails_before_the_output_folder_is_made(tmp_path, capsys):
    message = error_of([*TINY_FLAGS, "--reward", "nope", "--output-dir", str(tmp_path / "out")], capsys)
    assert "nope" in message and "allowed" in message
    assert not (tmp_path / "out").exists()


def test_help_shows_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--epochs EPOCHS training epochs (default: 10)", "AdamW learning rate (default: 0.0003)",
                  "--lora-rank", "--kl-coefficient", "[ddpo-is, ddpo-sf, grpo]", "--rwr-beta", "(default: 1.0)",
                  "--per-prompt-advantages", "(default: true)", "--prompt-file", "--overwrite", "--resume"):
        assert shown in text, shown


def test_resume_continues_the_saved_config_and_refuses_changes(tmp_path, capsys):
    out = str(tmp_path / "run")
    main([*TINY_FLAGS, "--epochs", "1", "--learning-rate", "1e-3", "--output-dir", out])
    capsys.readouterr()
    # --resume alone continues the saved config: 1 epoch of 1, nothing more (no config file's 10).
    main(["--output-dir", out, "--resume"])
    printed = capsys.readouterr().out
    assert f"resuming {out} from checkpoint-0001 (epoch 1 of 1)" in printed
    assert not (tmp_path / "run" / "checkpoint-0002").exists()
    message = error_of(["--output-dir", out, "--resume", "--learning-rate", "3e-4", "--seed", "1"], capsys)
    assert "[optimizer] learning_rate: saved 0.001, given 0.0003" in message and "[run] seed: saved 0, given 1" in message
    main(["--output-dir", out, "--resume", "--epochs", "2"])
    assert "(epoch 1 of 2)" in capsys.readouterr().out
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoint-0002"


def test_a_run_folder_is_not_reused_without_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    main([*TINY_FLAGS, "--epochs", "2", "--output-dir", out])
    capsys.readouterr()
    message = error_of([*TINY_FLAGS, "--epochs", "1", "--output-dir", out], capsys)
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    main([*TINY_FLAGS, "--epochs", "1", "--output-dir", out, "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-0001"]


def test_prompts_from_a_file_are_recorded_by_path(tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# two prompts\na red circle on a blue background\ntwo green squares\n")
    out = tmp_path / "run"
    main([*TINY_FLAGS, "--epochs", "1", "--prompt-file", str(prompt_file), "--output-dir", str(out)])
    saved = json.loads((out / "checkpoint-0001" / "config.json").read_text())
    assert saved["env"]["prompt_file"] == str(prompt_file.resolve())
    capsys.readouterr()
    message = error_of([*TINY_FLAGS, "--prompt-file", str(tmp_path / "none.txt"), "--output-dir", str(tmp_path / "b")], capsys)
    assert "none.txt' does not exist" in message


def test_the_sampler_and_its_options_come_from_the_config_and_reach_the_environment(tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from agents.train import Run
    from diffusion_env.backends import PixelUNetDenoiser, register_model, tiny_random_denoiser
    from diffusion_env.samplers.flow import FlowSampler

    def tiny_flow_model():
        tiny = tiny_random_denoiser()  # its UNet's output read as a velocity
        return PixelUNetDenoiser(tiny.unet, FlowMatchEulerDiscreteScheduler(), tiny.prompt_encoder)

    register_model("tiny-flow-test", tiny_flow_model, overwrite=True)
    config_file = tmp_path / "flow.toml"
    config_file.write_text('[env]\nmodel = "tiny-flow-test"\nsampler_options = { noise = "cps", noise_level = 0.5 }\n')
    config, *_ = parse_args(["--config", str(config_file), "--output-dir", str(tmp_path / "out"), *TINY_FLAGS[2:],
                             "--sampler-options", '{"noise": "dance", "noise_level": 0.5, "window": [0, 1]}'])
    assert config.env.sampler_options == {"noise": "dance", "noise_level": 0.5, "window": [0, 1]}  # the flag wins
    sampler = Run(config).env.unwrapped.sampler
    assert isinstance(sampler, FlowSampler) and (sampler.noise, sampler.noise_level, sampler.window) == ("dance", 0.5, (0, 1))
    capsys.readouterr()
    assert error_of(["--output-dir", str(tmp_path), "--sampler-options", "{noise"], capsys).endswith(
        "allowed: a JSON object such as '{\"key\": 1}'"
    )
