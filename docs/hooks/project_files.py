"""MkDocs hooks: pages that live outside ``docs/`` and tables generated from benchmark results.

- The notebooks of ``examples/notebooks/`` are added to the site as ``notebooks/<name>.ipynb``
  (rendered by mkdocs-jupyter), so that they have one copy, the one CI executes.
- ``CONTRIBUTING.md`` at the repository root is the site's ``contributing.md``.
- Sphinx-style roles in docstrings (``:class:`~pkg.mod.Name```), which mkdocstrings renders as
  text, become cross-references: a link where the target is documented, plain code otherwise.
- A line ``<!-- results-table: PATH -->`` in a page is replaced by a Markdown table of the
  learning benchmark's ``results.json`` at ``docs/PATH`` (``benchmarks/learning.py --out``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "examples" / "notebooks"
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(?P<tilde>~?)(?P<target>[\w.]+)</code>")
RESULTS_MARKER = re.compile(r"^<!-- results-table: (?P<path>\S+) -->$", re.MULTILINE)

# Columns of a results table: (heading, key in the evaluation, format).
FIGURES = [
    ("JPEG kB", "jpeg_kb", "{:.3f}"),
    ("background", "scene_background", "{:.2f}"),
    ("colour", "scene_color", "{:.2f}"),
    ("shape", "scene_shape", "{:.2f}"),
    ("count", "scene_count", "{:.2f}"),
    ("size", "scene_size", "{:.2f}"),
    ("mean agreement", "scene_alignment", "{:.2f}"),
]


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files: Files, config) -> Files:
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        # src_dir examples/ and path notebooks/NAME: the page's URL is notebooks/NAME/.
        files.append(File(f"notebooks/{notebook.name}", str(NOTEBOOKS.parent), config["site_dir"], config["use_directory_urls"]))
    contributing = ROOT / "CONTRIBUTING.md"
    if contributing.exists():
        files.append(File.generated(config, "contributing.md", content=contributing.read_text(encoding="utf-8")))
    return files


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f} %"


def results_table(results: dict) -> str:
    """One row per run and prompt set: pretrained -> fine-tuned for each figure."""
    heading = ["run", "epochs", "train minutes", "device", "prompts"] + [name for name, _, _ in FIGURES]
    lines = ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    for run, entry in results.items():
        config = entry["config"]
        label = f"`{run}`: {config['algorithm']}, `{config['reward']}`"
        for prompts in ("scenes_train", "scenes_heldout"):
            before, after = entry.get(f"{prompts}/pretrained"), entry.get(f"{prompts}/fine-tuned")
            if before is None or after is None:
                continue
            cells = [label, str(entry["epochs"]), f"{entry['train_minutes']:.1f}", config.get("device", "?"), prompts]
            for _, key, form in FIGURES:
                cell = f"{form.format(before[key])} -> {form.format(after[key])}"
                if key == "jpeg_kb":
                    cell += f" ({_change(before[key], after[key])})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
            label = ""
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        path = Path(config["docs_dir"]) / match["path"]
        return results_table(json.loads(path.read_text(encoding="utf-8")))

    return RESULTS_MARKER.sub(replace, markdown)


def on_page_content(html: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        target = match["target"]
        label = target.rsplit(".", 1)[-1] if match["tilde"] else target
        # "optional": mkdocs-autorefs links it when the target is documented and stays silent otherwise.
        return f'<autoref identifier="{target}" optional><code>{label}</code></autoref>'

    return SPHINX_ROLE.sub(replace, html)
