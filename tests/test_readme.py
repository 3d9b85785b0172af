"""Every Python block of README.md runs, each in a fresh interpreter as a reader would paste it,
at small settings: textual replacements shrink batch sizes and run lengths, and each replacement
must find its text, so that a README edit that changes a block fails here instead of passing
unchecked."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# For each block, identified by a line it holds: (replacements to small settings, code run before it).
SMALL = {
    'env = gym.make("DiffusionDenoise-v0", reward="jpeg_compressibility"': ([("num_inference_steps=20", "num_inference_steps=4")], ""),
    'envs = gym.make_vec("DiffusionDenoise-v0", num_envs=32': ([("num_envs=32", "num_envs=4"), ('device="cuda"', f'device="{DEVICE}"')], ""),
    "SB3VecEnvAdapter(gym.make_vec(": (
        [
            ("num_envs=8", "num_envs=2, num_inference_steps=4"),
            ("n_steps=20", "n_steps=4"),
            ("batch_size=160", "batch_size=8"),
            ('policy_kwargs={"per_dimension_ratio": True}', 'n_epochs=1, policy_kwargs={"per_dimension_ratio": True, "num_inference_steps": 4}'),
            ("total_timesteps=1_600", "total_timesteps=8"),
        ],
        "",
    ),
    # The plugging-in block names the reader's own classes; stand-ins from the library take their place.
    'diffusion_env.register_model("my-model"': (
        [],
        textwrap.dedent(
            """
            import gymnasium as gym
            import diffusion_env
            from diffusion_env.backends import tiny_random_denoiser
            from diffusion_env.samplers import GaussianTransition as MySampler

            def MyBackend(*args):
                return tiny_random_denoiser()

            open("p.txt", "w").write("a red circle on a blue background\\n")
            """
        ),
    ),
}


def test_every_python_block_has_small_settings():
    assert BLOCKS, "README.md has no python block"
    unknown = [block.splitlines()[0] for block in BLOCKS if not any(key in block for key in SMALL)]
    assert not unknown, f"python blocks without small settings in tests/test_readme.py: {unknown}"


@pytest.mark.parametrize("key", list(SMALL))
def test_readme_block_runs(key, tmp_path):
    matching = [block for block in BLOCKS if key in block]
    assert len(matching) == 1, f"{len(matching)} README python blocks hold {key!r}"
    code = matching[0]
    replacements, prelude = SMALL[key]
    for old, new in replacements:
        assert old in code, f"the README block no longer holds {old!r}; update tests/test_readme.py"
        code = code.replace(old, new)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", prelude + "\n" + code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_is_under_12_kb():
    # The README is the user's entry point; details belong in docs/.
    assert len(README.encode("utf-8")) < 12 * 1024
