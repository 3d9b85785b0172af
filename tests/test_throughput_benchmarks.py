"""The benchmarks run end to end at tiny settings (the test-sized model, or the built-in one for its quality) and print their figures.

Only that the figures are printed is checked: the timings of a busy test machine mean nothing.
"""

import re
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
NUMBER = r"[\d,]+\.\d+"


def run_main(script, argv):
    """Runs a script's main as ``python benchmarks/SCRIPT`` does: with its folder first on sys.path."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        runpy.run_path(str(BENCHMARKS / script))["main"](argv)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_env_throughput_prints_the_rates_of_the_three_paths_and_the_memory_over_episodes(capsys):
    run_main("env_throughput.py", ["--model", "tiny-random", "--batch-sizes", "2", "--steps", "2", "--episodes", "1",
                                   "--memory-episodes", "10", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "model tiny-random: network 0.34 M parameters, latents 16x16, 2 steps of DDIMScheduler" in out
    # batch, transitions/s of env, bare loop and pipeline path, env / bare, env / pipeline.
    assert re.search(rf"^\s+2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+peak RSS so far \d+ MB$", out, re.MULTILINE)
    assert re.search(rf"after episode\s+10: RSS\s+{NUMBER} MB", out)
    assert re.search(r"growth from episode 10 to 10: [+-]\d+\.\d MB", out)


def test_env_throughput_refuses_an_unregistered_model_and_too_short_a_memory_check(capsys):
    with pytest.raises(SystemExit):
        run_main("env_throughput.py", ["--model", "no-such-model"])
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main("env_throughput.py", ["--model", "tiny-random", "--memory-episodes", "5"])
    assert "allowed: 10 or more" in capsys.readouterr().err


def test_train_throughput_prints_each_update_paths_rate_and_the_speed_ups(capsys):
    run_main("train_throughput.py", ["--model", "tiny-random", "--num-envs", "2", "--steps", "2", "--minibatch", "4",
                                     "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "tiny-random 16x16; 2 samples x 2 steps" in out
    assert len(re.findall(rf"{NUMBER} transitions/s  \(peak RSS so far \d+ MB\)", out)) == 3
    assert re.search(r"speed-up over the timestep loop at batch 4: \d+\.\d\dx; at batch 2: \d+\.\d\dx", out)


def test_reward_throughput_prints_each_rewards_rate_and_the_asynchronous_saving(capsys):
    run_main("reward_throughput.py", ["--batch-size", "4", "--repeats", "1", "--steps", "2", "--batches", "2",
                                      "--delay", "0.05", "--skip-aesthetic"])
    out = capsys.readouterr().out
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "scene_alignment", "prompt_alignment"):
        assert re.search(rf"{name}\s+[\d,]+ images/s", out)
    assert "aesthetic" not in out
    for figure in ("sampling alone", "synchronous", "asynchronous", "saved"):
        assert re.search(rf"{figure}\s+-?{NUMBER} s", out)


def test_train_throughput_compares_training_epochs_of_one_and_two_processes(capsys):
    run_main("train_throughput.py", ["--processes", "2", "--num-envs", "4", "--steps", "2", "--epochs", "2",
                                     "--minibatch", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(rf"^1 process\(es\),\s+4 samples each:\s+{NUMBER} s/epoch,\s+{NUMBER} samples/s$", out, re.MULTILINE)
    assert re.search(rf"^2 process\(es\),\s+2 samples each:\s+{NUMBER} s/epoch,\s+{NUMBER} samples/s$", out, re.MULTILINE)
    assert re.search(r"2 processes against 1: \d+\.\d\dx", out)
    with pytest.raises(SystemExit):
        run_main("train_throughput.py", ["--processes", "3", "--num-envs", "4"])
    assert "allowed: 2 or more processes that divide --num-envs" in capsys.readouterr().err


def test_builtin_model_quality_reads_each_split_with_the_scene_parser(tmp_path, capsys):
    run_main("builtin_model_quality.py", ["--samples", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "shapes32: GaussianTransition of DDIMScheduler, 20 steps, guidance 1.0" in out
    for split in ("train", "held-out"):
        assert re.search(rf"^\s*{split}(\s+\d\.\d{{3}}){{6}}$", out, re.MULTILINE)
    assert (tmp_path / "samples_train.png").is_file() and (tmp_path / "samples_held-out.png").is_file()


def test_a_shaped_pipeline_folder_feeds_the_sync_check(tmp_path, capsys):
    run_main("shaped_pipelines.py", ["--shape", "tiny", "--out", str(tmp_path / "pipeline")])
    run_main("sync_check.py", ["--model", str(tmp_path / "pipeline"), "--steps", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"tiny-shaped pipeline \(UNet 0\.\d M parameters, random weights\)", out)
    assert "device cpu: no CUDA, nothing to check (1 step(s) ran)" in out
    with pytest.raises(SystemExit):
        run_main("sync_check.py", ["--steps", "2"])
    assert "allowed: 3 or more" in capsys.readouterr().err


def test_the_benchmarks_build_a_shaped_pipeline_in_memory(capsys):
    run_main("env_throughput.py", ["--model", "shaped:tiny", "--batch-sizes", "2", "--steps", "2", "--episodes", "1",
                                   "--memory-episodes", "10", "--device", "cpu"])
    assert "model shaped:tiny: network 0.07 M parameters, latents 8x8, 2 steps of DDIMScheduler" in capsys.readouterr().out
    run_main("sync_check.py", ["--model", "shaped:tiny", "--steps", "3", "--device", "cpu"])
    assert "device cpu: no CUDA, nothing to check (1 step(s) ran)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_main("env_throughput.py", ["--model", "shaped:sd2"])
    assert "unknown shape 'sd2' in --model 'shaped:sd2'; allowed: shaped:sd15, shaped:sd35-medium, shaped:tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main("sync_check.py", ["--model", "shaped:sd2"])
    assert "unknown shape 'sd2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main("train_throughput.py", ["--model", "shaped:tiny", "--processes", "2", "--num-envs", "4"])
    assert "each training process reads the model by name" in capsys.readouterr().err
