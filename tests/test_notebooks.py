"""The Colab quickstart notebooks: committed files equal their generator; both run end to end.

Execution uses nbclient with the venv's python3 kernel at a smoke size (STARJAX_NOTEBOOK_TINY=1),
one CPU device and XLA's backend optimisation off (these programs are tiny; LLVM time would
dominate), then reads the `RESULTS {...}` line each notebook prints last.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import xla_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _generator():
  spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["star_quickstart.ipynb", "quiet_star_quickstart.ipynb"])
def test_committed_notebooks_are_generated_and_clean(name):
  text = (NB_DIR / name).read_text(encoding="utf-8")
  assert text == _generator().render(name), (
      f"{name} differs from notebooks/make_notebooks.py: run `python notebooks/make_notebooks.py`")
  nb = nbformat.reads(text, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "pip" in code[0].source and "google.colab" in code[0].source  # The install cell.
  assert "(filled in" not in text  # Expected numbers are stated.


def _run(name: str, tmp_path: Path, monkeypatch) -> tuple[nbformat.NotebookNode, dict]:
  monkeypatch.setenv("STARJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("STARJAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("XLA_FLAGS", xla_env.flags(devices=1))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "agg")  # The notebook switches to inline itself.
  nb = nbformat.read(NB_DIR / name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # Raises CellExecutionError (with the traceback) if any cell fails.
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot shown"
  lines = [line for o in outputs if o.output_type == "stream"
           for line in o.text.splitlines() if line.startswith("RESULTS ")]
  assert len(lines) == 1, "the last cell prints one RESULTS line"
  return nb, json.loads(lines[0][len("RESULTS "):])


@pytest.mark.slow
def test_star_notebook_runs(tmp_path, monkeypatch):
  _, res = _run("star_quickstart.ipynb", tmp_path, monkeypatch)
  assert len(res["accuracy"]) == 2  # Iteration 0 (seed model) and 1.
  assert all(0.0 <= a <= 1.0 for a in res["accuracy"])
  for by_digits in res["accuracy_by_digits"]:
    assert set(by_digits) == {"1", "2", "3"}
    assert all(0.0 <= a <= 1.0 for a in by_digits.values())
  assert (tmp_path / "workdir" / "results.json").exists()


@pytest.mark.slow
def test_quiet_star_notebook_runs(tmp_path, monkeypatch):
  _, res = _run("quiet_star_quickstart.ipynb", tmp_path, monkeypatch)
  assert {len(v) for v in res.values()} == {4}  # STEPS in the tiny setting.
  assert all(math.isfinite(x) for v in res.values() for x in v)
  # A from-scratch byte model starts near the uniform loss ln(261) = 5.56 nats.
  assert 4.5 < res["base_loss"][0] < 6.5 and 4.5 < res["talk_loss"][0] < 6.5
  assert res["mixing_weight"][0] == 0.0  # The mixing head's output layer starts at zero.
