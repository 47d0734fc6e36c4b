"""Execute every notebook in notebooks/ top to bottom and check a key output of each.

Each notebook runs in a fresh ``python3`` kernel (the venv's ipykernel) with the repository root as
working directory. The notebooks train short breakers and build the tiny world, so this file takes
a few minutes on two cores: it is marked ``slow`` and skipped when nbclient or ipykernel is missing.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 180

#: Per notebook: regular expressions that must all appear in its stdout.
EXPECTED: dict[str, list[str]] = {
    "01_quickstart.ipynb": [
        r"harmful firing point: fires at token",
        r"mean response cosine, harmful: -?\d\.\d+",
    ],
    "02_figure6.ipynb": [
        r"organism firing point: fires at token",
        r"SmolLM2 firing point: |SmolLM2 is not available",
    ],
    "03_train_and_ablate.ipynb": [r"most stable loss: (rr|rmu|random_norm|refusal_direction)"],
    "04_attacks_and_durability.ipynb": [r"steps to 50%: "],
    "05_generalisation.ipynb": [r"loo: mean held-out ASR \d", r"live mean held-out ASR: "],
    "06_why_it_fires.ipynb": [
        r"organism minimal sufficient blocks: \{",
        r"topic word outranks template word \(occlusion\): \d",
        r"SmolLM2 minimal sufficient blocks: |SmolLM2 is not available",
    ],
}


def _kernel_name() -> str:
    """The kernelspec of this interpreter (install it into the venv when missing)."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().get_all_specs()
    spec = specs.get("python3")
    if spec is None or Path(spec["spec"]["argv"][0]).resolve() != Path(sys.executable).resolve():
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix, kernel_name="python3")
    return "python3"


def _stdout(nb: object) -> str:
    out = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                out.append(output["text"])
    return "".join(out)


def test_every_notebook_is_listed() -> None:
    """A new notebook must get an expected output here."""
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_outputs_are_stripped(name: str) -> None:
    """Notebooks live in git without outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{name}: a cell has outputs; strip them"
            assert cell.get("execution_count") is None, f"{name}: execution counts left in"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name: str) -> None:
    """The notebook runs without errors and prints its key result."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    text = _stdout(nb)
    for pattern in EXPECTED[name]:
        assert re.search(pattern, text), f"{name}: no output matching {pattern!r}\n{text[-2000:]}"
    figures = sum(
        "application/vnd.plotly.v1+json" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )
    assert figures >= 1, f"{name}: no plotly figure was shown"
