"""A new user's path on a fresh clone: clone the repository, install it into a new virtual
environment, then run what README.md tells a reader to run, as written there (the main job, the
quick-start block and the first training command), at settings small enough for a test.

The clone is of the committed HEAD, so this also catches a file that the README's commands need
but that was never committed. The dependencies are the ones already installed (nothing large is
downloaded): the new environment sees them through ``--system-site-packages`` and, where the tests
themselves run in a virtual environment, through a ``.pth`` file naming that environment's
site-packages. The package itself is installed from the clone, and the test checks that the clone
is what is imported."""

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TAIL = 3000  # characters of a failed command's output shown in the failure message

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a git checkout"
)


def run(step: str, command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``command``; fails naming ``step`` with the tail of its stderr (and stdout) if it fails."""
    start = time.monotonic()
    try:
        result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        pytest.fail(f"{step}: timed out after {timeout:.0f} s: {shlex.join(command)}\n--- stderr (tail) ---\n{stderr[-TAIL:]}")
    print(f"{step}: {time.monotonic() - start:.1f} s")
    if result.returncode != 0:
        pytest.fail(
            f"{step}: exit status {result.returncode}: {shlex.join(command)} (in {cwd})\n"
            f"--- stderr (tail) ---\n{result.stderr[-TAIL:]}\n--- stdout (tail) ---\n{result.stdout[-TAIL:]}"
        )
    return result


def section(readme: str, heading: str) -> str:
    """The text of README.md from ``heading`` to the next heading of the same level."""
    match = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^## |\Z)", readme, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no {heading!r} section"
    return match.group(1)


def first_block(text: str, language: str, where: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)
    assert match, f"README.md: no ```{language} block in {where}"
    return match.group(1)


@pytest.fixture(scope="module")
def new_user(tmp_path_factory):
    """A fresh clone and a virtual environment with the clone installed: (clone, python, env)."""
    tmp = tmp_path_factory.mktemp("new_user")
    clone = tmp / "clone"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    run("git clone", ["git", "clone", "--quiet", str(ROOT), str(clone)], cwd=tmp, env=env)

    venv = tmp / "venv"
    # --without-pip: the pip (and setuptools, the build back-end) already installed are used; the
    # ones venv would bundle are older than the setuptools pyproject.toml needs, and would come first.
    run("python -m venv", [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = run("venv site-packages", [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env)
    venv_site = Path(purelib.stdout.strip())
    if sys.prefix != sys.base_prefix:
        # The tests run in a virtual environment, whose packages --system-site-packages does not
        # reach: name its site-packages in a .pth file (its own .pth files, among them the
        # checkout's editable install, are not processed from there).
        ours = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
        ours = list(dict.fromkeys(p for p in ours if Path(p).is_dir() and Path(p).resolve() != venv_site.resolve()))
        (venv_site / "zz_reuse_installed_dependencies.pth").write_text("\n".join(ours) + "\n")

    run(
        "pip install -e <clone>",
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(clone)],
        cwd=tmp,
        env=env,
    )
    # Outside the clone, so that the import goes through the installation, not the working directory.
    imported = run("import diffusion_env", [str(python), "-c", "import diffusion_env; print(diffusion_env.__file__)"], cwd=tmp, env=env)
    location = Path(imported.stdout.strip().splitlines()[-1]).resolve()
    assert location.is_relative_to(clone.resolve()), f"import diffusion_env: {location} is not in the clone {clone}"
    return clone, python, env


def test_main_job(new_user, tmp_path):
    clone, python, env = new_user
    out = tmp_path / "rollout"
    run("main job (python -m agents.rollout)", [str(python), "-m", "agents.rollout", "--out", str(out)], cwd=clone, env=env)
    for name in ("samples.png", "samples.json"):
        assert (out / name).is_file(), f"main job: no {name} in {out}: {sorted(p.name for p in out.iterdir()) if out.exists() else 'no folder'}"


def test_quick_start(new_user, tmp_path):
    clone, python, env = new_user
    readme = (clone / "README.md").read_text(encoding="utf-8")
    block = first_block(section(readme, "## Quick start"), "python", "## Quick start")
    assert "num_inference_steps=20" in block, "quick start: the block no longer says num_inference_steps=20"
    script = tmp_path / "quick_start.py"
    script.write_text(block.replace("num_inference_steps=20", "num_inference_steps=4"), encoding="utf-8")
    result = run("quick start (README python block)", [str(python), str(script)], cwd=clone, env=env)
    printed = result.stdout.strip()
    assert printed, "quick start: printed nothing"
    # It prints the prompt, then the reward and its details; the built-in prompts are words.
    assert re.match(r"[A-Za-z]+ ", printed.splitlines()[-1]), f"quick start: does not begin with a prompt: {printed[-500:]!r}"


def test_first_training_command(new_user, tmp_path):
    clone, python, env = new_user
    readme = (clone / "README.md").read_text(encoding="utf-8")
    block = first_block(section(readme, "## Training"), "bash", "## Training")
    line = next(line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    words = shlex.split(line, comments=True)
    assert words[:3] == ["python", "-m", "agents.train"], f"training: unexpected first command {line!r}"
    assert "--output-dir" in words, f"training: no --output-dir in {line!r}"
    output_dir = tmp_path / "run"
    words[words.index("--output-dir") + 1] = str(output_dir)
    # Two epochs as asked; the README's config samples 4 batches of 16 trajectories of 20 steps an
    # epoch (about half a minute on a 2-core CPU): one batch of 4 trajectories of 4 steps keeps the
    # test to seconds while still running collection, update and checkpointing.
    words += ["--epochs", "2", "--num-envs", "4", "--samples-per-prompt", "4", "--batches-per-epoch", "1", "--num-inference-steps", "4"]
    command = [str(python), *words[1:]]
    run("training (README's first agents.train command)", command, cwd=clone, env=env)
    assert (output_dir / "latest").is_file(), f"training: no 'latest' checkpoint pointer in {output_dir}: {sorted(p.name for p in output_dir.iterdir())}"
