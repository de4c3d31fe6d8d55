"""The documents' examples that are meant to run, run as a newcomer would: copied into an empty
folder and run there, with the venv's commands first on PATH.

A document marks such a code block with an HTML comment on the line before its fence (invisible
on GitHub): `<!-- example: clinic_tasks.py -->` writes the block to that file,
`<!-- example: run -->` runs the block with bash. A document's files are written first, then its
run blocks run in order; each must exit 0 and every `fedcycle simulate` in it must complete and
learn: the last round's primary metric better than round 0's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcycle.results import read_metrics

pytestmark = pytest.mark.e2e  # runs the examples' commands as processes

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- example: (?P<kind>[^\n]*?) -->\n```[\w-]*\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
ANY_MARKER = re.compile(r"<!-- example:.*?-->")
FILE_NAME = re.compile(r"[\w-]+(\.[\w-]+)+")  # a file beside the others, never a path
# which way is better for the examples' primary metrics (metrics.jsonl names the metric, not its direction)
DIRECTIONS = {"accuracy": "max", "auroc": "max", "mae": "min", "mse": "min"}


def examples(document: Path) -> tuple[dict[str, str], list[str]]:
    """A document's marked blocks: the files to write (name -> text) and the scripts to run."""
    files, scripts = {}, []
    for found in MARKER.finditer(document.read_text(encoding="utf-8")):
        kind, body = found["kind"], found["body"]
        if kind == "run":
            scripts.append(body)
        elif FILE_NAME.fullmatch(kind):
            assert kind not in files, f"{document.name}: two examples write {kind}"
            files[kind] = body
        else:
            raise ValueError(f"{document.name}: example {kind!r} is neither 'run' nor a file name")
    return files, scripts


def runnable() -> list[Path]:
    return [doc for doc in DOCUMENTS if examples(doc)[1]]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_marker_is_an_example_this_test_runs(document):
    text = document.read_text(encoding="utf-8")
    files, scripts = examples(document)
    assert len(ANY_MARKER.findall(text)) == len(files) + len(scripts), \
        f"{document.name}: a marker that is not on the line just before a code block's fence"
    assert not files or scripts, f"{document.name}: example files {sorted(files)} but nothing runs them"


def test_the_marker_convention_refuses_an_unknown_kind(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- example: runn -->\n```bash\necho hi\n```\n")
    with pytest.raises(ValueError, match="example 'runn' is neither 'run' nor a file name"):
        examples(doc)
    doc.write_text("<!-- example: run -->\n```bash\necho hi\n```\n<!-- example: a.py -->\n```python\npass\n```\n")
    assert examples(doc) == ({"a.py": "pass\n"}, ["echo hi\n"])


def test_the_readme_has_a_runnable_example():
    assert ROOT / "README.md" in runnable()


def better(run: Path) -> tuple[float, float]:
    """A run's primary metric in round 0 and the last round, signed so that higher is better."""
    rounds = read_metrics(run / "metrics.jsonl")
    metric = rounds[-1]["primary_metric"]
    sign = 1 if DIRECTIONS[metric] == "max" else -1
    return sign * rounds[0][metric], sign * rounds[-1][metric]


@pytest.mark.parametrize("document", runnable(), ids=lambda p: p.name)
def test_a_documents_example_runs_as_written_and_learns(document, tmp_path):
    files, scripts = examples(document)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for script in scripts:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{script}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        simulations = script.count("fedcycle simulate")
        assert out.stdout.count("status: finished:completed") == simulations, out.stdout[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "results").glob("*/metrics.jsonl"))
    assert len(runs) == sum(s.count("fedcycle simulate") for s in scripts)
    for run in runs:
        first, last = better(run)
        assert last > first, f"{run.name}: {read_metrics(run / 'metrics.jsonl')}"
