"""The main job: a rollout of the model's sampler that saves images, prompts, rewards and likelihoods."""

import json

import numpy as np
import pytest
from PIL import Image

from agents import rollout
from diffusion_env.images import image_grid


def test_rollout_saves_a_grid_and_one_record_per_image(tmp_path):
    args = rollout.build_parser().parse_args(
        ["--model", "tiny-random", "--num-envs", "3", "--num-inference-steps", "3", "--out", str(tmp_path), "--upscale", "2"]
    )
    summary = rollout.rollout(args)
    records = json.loads((tmp_path / "samples.json").read_text())
    assert len(records) == 3
    assert all(r["reward"] == -r["jpeg_kb"] and np.isfinite(r["log_likelihood"]) for r in records)
    assert summary["reward_mean"] == np.float32(np.mean([r["reward"] for r in records]))
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (3 * 16 * 2, 16 * 2)


def test_image_grid_tiles_row_by_row():
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    grid = image_grid(images, columns=3)
    assert grid.shape == (4, 6, 3)
    np.testing.assert_array_equal(grid[2:4, 2:4], images[4])
    assert (grid[2:4, 4:6] == 0).all()
    padded = image_grid(images, columns=3, padding=1, fill=128)
    assert padded.shape == (8, 12, 3)
    np.testing.assert_array_equal(padded[5:7, 5:7], images[4])
    assert (padded[4] == 128).all()


def test_the_command_exits_0_on_success_and_2_with_one_line_on_a_bad_argument(tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# my prompts\na red circle on a blue background\n\ntwo green squares\n")
    common = ["--model", "tiny-random", "--num-envs", "2", "--num-inference-steps", "2", "--upscale", "1"]
    assert rollout.main([*common, "--prompt-file", str(prompt_file), "--out", str(tmp_path / "out")]) == 0
    prompts = {record["prompt"] for record in json.loads((tmp_path / "out" / "samples.json").read_text())}
    assert prompts <= {"a red circle on a blue background", "two green squares"}
    for bad, message in (
        (["--model", "sd-99"], "unknown model 'sd-99'"),
        (["--device", "xyz"], "device='xyz' is not a torch device"),
        (["--prompt-file", str(tmp_path / "none.txt")], "prompt file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            rollout.main([*common, "--out", str(tmp_path / "bad"), *bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert message in error[-1] and "Traceback" not in "\n".join(error)
