"""The learning benchmark's evaluation runs end to end on a tiny training run (the figures it
reports for the built-in model are in the README; here only that it evaluates what it says)."""

import json
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from agents import GaussianDenoisingPolicy, collect_trajectories
from agents.config import TrainConfig
from agents.train import train

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "learning.py"
EXAMPLES = Path(__file__).parent.parent / "examples"


def test_learning_benchmark_compares_a_run_with_the_pretrained_model(tmp_path, monkeypatch, capsys):
    config = TrainConfig.from_tables({
        "run": {"epochs": 2, "device": "cpu"},
        "env": {"model": "tiny-random", "num_envs": 4, "samples_per_prompt": 2, "batches_per_epoch": 1, "num_inference_steps": 2},
        "reward": {"monitor": "scene_alignment"},
        "optimizer": {"lora_rank": 0, "learning_rate": 1e-3},
        "algorithm": {"minibatch_size": 4},
    })
    train(config, tmp_path / "run")
    train(config.with_changes({"run": {"seed": 1, "epochs": 1}}), tmp_path / "seed1")
    monkeypatch.setattr(sys, "argv", ["sb3_ppo.py", "--rollouts", "1", "--num-envs", "2", "--samples-per-prompt", "2",
                                      "--num-inference-steps", "2", "--batch-size", "4", "--min-sigma", "0", "--model", "tiny-random",
                                      "--device", "cpu", "--output-dir", str(tmp_path / "sb3")])
    runpy.run_path(str(EXAMPLES / "sb3_ppo.py"), run_name="__main__")
    capsys.readouterr()
    # A folder holding only a history: plotted in the comparison, not evaluated.
    (tmp_path / "curve").mkdir()
    (tmp_path / "curve" / "history.json").write_text((tmp_path / "sb3" / "history.json").read_text())
    monkeypatch.setattr(sys, "argv", ["learning.py", str(tmp_path / "run"), str(tmp_path / "seed1"), f"{tmp_path / 'run'}:1",
                                      str(tmp_path / "sb3"), str(tmp_path / "curve"), "--samples", "16", "--compare",
                                      "--out", str(tmp_path / "eval")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    table = capsys.readouterr().out
    assert table.count("| pretrained |") == 8 and table.count("| fine-tuned |") == 8
    assert table.count("| sb3 | sb3-ppo |") == 4 and "| curve | (no checkpoint: curve only) |" in table
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # Same prompts and noise: the pretrained figures do not depend on the run evaluated.
    assert results["run"]["scenes_train/pretrained"] == results["run@1"]["scenes_train/pretrained"]
    assert results["run"]["epochs"] == 2 and results["run@1"]["epochs"] == 1
    assert results["run"]["config"] == config.to_tables()  # the saved config, read back through load_run
    # The last epoch's weights differ from the first's, and so do their samples.
    assert results["run"]["scenes_train/fine-tuned"] != results["run"]["scenes_train/pretrained"]
    # Every sample's alignment is defined, so the mean paired change is the change of the means.
    change = results["run"]["scenes_train/change"]["scene_alignment"]
    expected = results["run"]["scenes_train/fine-tuned"]["scene_alignment"] - results["run"]["scenes_train/pretrained"]["scene_alignment"]
    assert abs(change["mean"] - expected) < 1e-6 and change["standard_error"] >= 0
    # The SB3 weights are loaded: its samples are those of the PPO-trained UNet, not the pretrained one.
    assert results["sb3"]["scenes_train/fine-tuned"] != results["sb3"]["scenes_train/pretrained"]
    # The two seeds and the cut run differ only in [run]: one setting of three seeds, beside SB3's.
    over_seeds = table.split("| setting | seeds |")[1]
    assert over_seeds.count("| ddpo-is, jpeg_compressibility | 3 |") == 2 and over_seeds.count("| sb3-ppo, jpeg_compressibility | 1 |") == 2
    changes = [results[label]["scenes_train/change"]["scene_alignment"]["mean"] for label in ("run", "seed1", "run@1")]
    row = next(line for line in over_seeds.splitlines() if "| ddpo-is, jpeg_compressibility | 3 | scenes_train |" in line)
    assert f"{np.mean(changes):+.3f} ± {np.std(changes, ddof=1):.3f}" in row
    # The KL to the pretrained model: positive for trained weights, with a standard error.
    kl = results["run"]["scenes_train/kl_to_pretrained"]
    assert kl["mean"] > 0 and kl["standard_error"] >= 0
    for name in ("frontier.png", "run_curves.png", "run@1_scenes_heldout_samples.png", "sb3_curves.png", "comparison.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_paired_change_is_the_mean_difference_of_the_pairs_defined_in_both_with_its_standard_error():
    paired_change = runpy.run_path(str(SCRIPT))["paired_change"]
    nan = float("nan")
    pretrained = np.array([0.0, 1.0, 0.0, 1.0, nan, 0.0])
    fine_tuned = np.array([1.0, 1.0, 1.0, 0.0, 1.0, nan])
    # Pairs 1-4: differences 1, 0, 1, -1; mean 1/4, sample variance (0.5625 + 0.0625 + 0.5625 + 1.5625) / 3.
    mean, standard_error = paired_change(pretrained, fine_tuned)
    assert mean == pytest.approx(0.25)
    assert standard_error == pytest.approx(np.sqrt(2.75 / 3 / 4))


def test_paired_change_without_two_defined_pairs_is_nan_without_a_warning():
    paired_change = runpy.run_path(str(SCRIPT))["paired_change"]
    nan = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        no_pair = paired_change(np.array([nan, 1.0]), np.array([0.0, nan]))
        one_pair = paired_change(np.array([nan, 1.0]), np.array([0.0, 0.5]))
    assert np.isnan(no_pair[0]) and np.isnan(no_pair[1])
    assert one_pair[0] == pytest.approx(-0.5) and np.isnan(one_pair[1])


def test_path_kl_sums_the_exact_kl_of_the_transitions_along_each_path(make_vec_env):
    path_kl = runpy.run_path(str(SCRIPT))["path_kl"]
    envs = make_vec_env(num_envs=3, array_type="torch")
    fine_tuned = GaussianDenoisingPolicy.from_env(envs, seed=0)
    pretrained = GaussianDenoisingPolicy.from_env(make_vec_env(num_envs=3, array_type="torch"))
    assert path_kl(collect_trajectories(envs, fine_tuned, seed=0), fine_tuned, pretrained) == pytest.approx(0.0)
    with torch.no_grad():
        for parameter in fine_tuned.network.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    samples = collect_trajectories(envs, fine_tuned, seed=0)
    # Independently: float64 torch.distributions per step, from the policies' own distributions.
    expected = torch.zeros(3, dtype=torch.float64)
    as64 = lambda d: Normal(d.loc.double(), d.scale.double())  # noqa: E731
    with torch.no_grad():
        for k in range(samples.num_steps):
            observation = samples.observations(torch.arange(3), torch.full((3,), k))
            p, q = (policy.distribution(observation).base_dist for policy in (fine_tuned, pretrained))
            expected += kl_divergence(as64(p), as64(q)).flatten(1).sum(1)
    kl = path_kl(samples, fine_tuned, pretrained)
    assert (kl > 0).all()
    np.testing.assert_allclose(kl, expected.numpy(), rtol=1e-4)


def test_seed_groups_gather_seeds_and_name_settings_of_one_algorithm_by_what_differs():
    seed_groups = runpy.run_path(str(SCRIPT))["seed_groups"]
    base = TrainConfig.from_tables({"algorithm": {"name": "ddpo-is", "kl_coefficient": 3e-5}})
    runs = {
        "is-s0": ("ddpo-is", base),
        "is-s1": ("ddpo-is", base.with_changes({"run": {"seed": 1, "epochs": 3}})),
        "kl-0": ("ddpo-is", base.with_changes({"algorithm": {"kl_coefficient": 0.0}})),
        "sf": ("ddpo-sf", TrainConfig.from_tables({"algorithm": {"name": "ddpo-sf"}})),
    }
    assert seed_groups(runs) == {
        "ddpo-is, jpeg_compressibility, kl_coefficient=3e-05": ["is-s0", "is-s1"],
        "ddpo-is, jpeg_compressibility, kl_coefficient=0.0": ["kl-0"],
        "ddpo-sf, jpeg_compressibility": ["sf"],
    }
