"""The main job: a rollout of the model's sampler that saves images, prompts, rewards and likelihoods."""

import json

import numpy as np
from PIL import Image

from agents import rollout
from diffusion_env.images import image_grid


def test_rollout_saves_a_grid_and_one_record_per_image(tmp_path):
    summary = rollout.main(
        ["--model", "tiny-random", "--num-envs", "3", "--num-inference-steps", "3", "--out", str(tmp_path), "--upscale", "2"]
    )
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
