"""Data-parallel training on 2 CPU processes (gloo), launched as a user launches it: ``accelerate launch``.

After every update both ranks hold bit-identical trainable parameters; the advantages they train
on are those one process computes over the gathered batch; ranks draw their own noise, shared
only within a group; a resumed 2-process run ends where an uninterrupted one does; a checkpoint
of 2 processes is refused by 1; a rank that dies makes the other fail instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.advantages import PerPromptStatTracker, clip_advantages, group_relative_advantages
from agents.config import TrainConfig
from agents.train import main

WORKER = Path(__file__).with_name("distributed_worker.py")
TABLES = {
    "run": {"device": "cpu", "epochs": 2},
    "env": {"model": "tiny-random", "prompts": "scenes_train", "num_envs": 4, "samples_per_prompt": 2,
            "batches_per_epoch": 1, "num_inference_steps": 2},
    "advantages": {"tracker_min_count": 2},
    "algorithm": {"minibatch_size": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict[str, str]:
    # One thread per process: two processes on two cores.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def accelerate_launch(*args: str, mixed_precision: str = "no", timeout: float = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` on 2 CPU processes, as a user runs it."""
    command = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=process_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tables(**changes) -> dict:
    merged = json.loads(json.dumps(TABLES))
    for table, entries in changes.items():
        merged.setdefault(table, {}).update(entries)
    return merged


def worker_outputs(out_dir: Path, epoch: int) -> tuple[dict, dict]:
    return tuple(torch.load(out_dir / f"rank{rank}-epoch{epoch}.pt") for rank in (0, 1))


def assert_same_parameters(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_grpo_ranks_stay_identical_draw_their_own_noise_and_share_the_group_advantages(tmp_path):
    # Two minibatches per optimiser step: the first one's gradient is accumulated without averaging.
    config = tables(env={"shared_noise": True}, algorithm={"name": "grpo", "minibatch_size": 2, "gradient_accumulation": 2})
    accelerate_launch(str(WORKER), json.dumps(config), str(tmp_path))
    grpo = TrainConfig.from_tables(config)
    previous = None
    for epoch in (1, 2):
        rank0, rank1 = worker_outputs(tmp_path, epoch)
        assert_same_parameters(rank0["parameters"], rank1["parameters"])
        if previous is not None:  # the update changed them
            assert any(not torch.equal(previous[n], rank0["parameters"][n]) for n in previous)
        previous = rank0["parameters"]
        # One process over the gathered batch (rank 1's groups renumbered after rank 0's) computes
        # exactly the advantages the two ranks trained on.
        rewards = torch.cat([rank0["rewards"], rank1["rewards"]])
        groups = torch.cat([rank0["groups"], rank1["groups"] + 4])
        expected = clip_advantages(
            group_relative_advantages(rewards, groups, grpo.algorithm.config.advantage_scale), grpo.advantages.clip
        )
        assert torch.equal(torch.cat([rank0["advantages"], rank1["advantages"]]), expected)
        # Shared initial noise within a group (samples 0-1, 2-3 of each rank), and only there.
        for noise in (rank0["initial_latents"], rank1["initial_latents"]):
            assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
            assert not torch.equal(noise[0], noise[2])
        assert not torch.equal(rank0["initial_latents"][0], rank1["initial_latents"][0])
        assert rank0["prompts"] != rank1["prompts"]


def test_per_prompt_advantages_are_those_of_one_process_over_the_gathered_batch(tmp_path):
    # Under accelerate's bf16 mixed precision (autocast): the trained parameters stay float32.
    config = tables(algorithm={"name": "ddpo-is", "minibatch_size": 2})
    accelerate_launch(str(WORKER), json.dumps(config), str(tmp_path), mixed_precision="bf16")
    ddpo = TrainConfig.from_tables(config)
    tracker = PerPromptStatTracker(ddpo.advantages.tracker_buffer_size, ddpo.advantages.tracker_min_count)
    for epoch in (1, 2):
        rank0, rank1 = worker_outputs(tmp_path, epoch)
        assert_same_parameters(rank0["parameters"], rank1["parameters"])
        assert all(p.dtype == torch.float32 for p in rank0["parameters"].values())
        expected = clip_advantages(
            tracker.update(rank0["prompts"] + rank1["prompts"], torch.cat([rank0["rewards"], rank1["rewards"]])),
            ddpo.advantages.clip,
        )
        assert torch.equal(torch.cat([rank0["advantages"], rank1["advantages"]]), expected)


def train_command(config_file: Path, output_dir: Path, *flags: str) -> list[str]:
    return ["-m", "agents.train", "--config", str(config_file), "--output-dir", str(output_dir), *flags]


def test_a_resumed_two_process_run_ends_where_an_uninterrupted_one_does(tmp_path, capsys):
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        '[run]\ndevice = "cpu"\nepochs = 2\n'
        '[env]\nmodel = "tiny-random"\nprompts = "scenes_train"\nnum_envs = 4\nsamples_per_prompt = 2\nnum_inference_steps = 2\n'
        '[advantages]\ntracker_min_count = 2\n[algorithm]\nname = "ddpo-is"\nminibatch_size = 2\n'
    )
    accelerate_launch(*train_command(config_file, tmp_path / "whole"))
    accelerate_launch(*train_command(config_file, tmp_path / "halves", "--epochs", "1"))
    accelerate_launch(*train_command(config_file, tmp_path / "halves", "--resume", "--epochs", "2"))
    whole, halves = (tmp_path / name / "checkpoint-0002" for name in ("whole", "halves"))
    assert_same_parameters(load_file(whole / "trainable.safetensors"), load_file(halves / "trainable.safetensors"))
    states = [torch.load(path / "state.pt", weights_only=True) for path in (whole, halves)]
    assert len(states[0]["random_states"]) == 2
    for key in ("sample_generator", "update_generator"):
        for rank in (0, 1):
            assert torch.equal(states[0]["random_states"][rank][key], states[1]["random_states"][rank][key])
    assert [{k: v for k, v in h.items() if k != "charts/epoch_seconds"} for h in states[0]["history"]] == [
        {k: v for k, v in h.items() if k != "charts/epoch_seconds"} for h in states[1]["history"]
    ]
    # Rank 0 alone wrote the run's files: one set of events and grids.
    assert len(list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # One process cannot continue a run of two: a one-line error, exit status 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "whole"), "--resume", "--epochs", "3"])
    assert exit_info.value.code == 2
    assert "written by a run of 2 process(es) and this run has 1" in capsys.readouterr().err


def test_a_rank_that_dies_makes_the_other_fail_instead_of_hanging(tmp_path):
    # Started without a launcher (whose agent would stop the other rank itself): rank 0 must notice.
    config = json.dumps(tables(run={"epochs": 3}, algorithm={"name": "ddpo-is", "minibatch_size": 2}))
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), config, str(tmp_path), "--die-after-epoch", "1"],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    started = time.monotonic()
    _, stderr = ranks[0].communicate(timeout=180)
    ranks[1].wait(timeout=60)
    assert ranks[1].returncode == -9  # killed itself after epoch 1
    # gloo's error at rank 0's next collective (its wording varies: closed connection, broken pipe).
    assert ranks[0].returncode != 0 and "remote worker" in stderr, stderr[-2000:]
    assert time.monotonic() - started < 180
    assert (tmp_path / "rank0-epoch1.pt").exists() and not (tmp_path / "rank0-epoch2.pt").exists()
