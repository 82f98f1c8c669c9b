"""Every notebook executes end to end (nbclient), on a random-init HF PoolFormer saved to disk."""

import json
import pathlib

import pytest

from conftest import cpu_env

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def execute(path: pathlib.Path, env: dict, monkeypatch) -> nbformat.NotebookNode:
  for key, value in env.items():
    monkeypatch.setenv(key, value)  # the kernel inherits the test's environment
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  return nb


def test_notebooks_are_committed_without_outputs():
  assert {p.stem for p in NOTEBOOKS} == {"quickstart", "convert_and_check", "train_on_tpu"}
  for path in NOTEBOOKS:
    for cell in json.loads(path.read_text())["cells"]:
      if cell["cell_type"] == "code":
        assert not cell["outputs"] and cell["execution_count"] is None, path.name


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
  """(HF model directory, converted JAX directory) of a random-init 1000-class S12."""
  import helpers_torch
  from poolformer_jax import convert, pretrained
  hf_dir = tmp_path_factory.mktemp("hf") / "poolformer_s12"
  helpers_torch.random_hf_model("poolformer_s12", num_labels=1000, seed=1).save_pretrained(hf_dir)
  converted = convert.convert(str(hf_dir))
  jax_dir = tmp_path_factory.mktemp("jax") / "poolformer_s12"
  pretrained.save_pretrained(str(jax_dir), converted.model, variant=converted.info.variant,
                             labels=converted.info.labels,
                             preprocessing=converted.info.preprocessing)
  return hf_dir, jax_dir


def outputs_text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


def images_shown(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)


@pytest.mark.slow
def test_quickstart_notebook(random_checkpoints, monkeypatch):
  _, jax_dir = random_checkpoints
  nb = execute(REPO / "notebooks" / "quickstart.ipynb",
               {"POOLFORMER_CHECKPOINT": str(jax_dir)}, monkeypatch)
  text = outputs_text(nb)
  assert "poolformer_s12: 1000 classes" in text
  assert all(name in text for name in ("astronaut", "coffee", "chelsea", "rocket"))
  assert images_shown(nb) == 1


@pytest.mark.slow
def test_convert_and_check_notebook(random_checkpoints, monkeypatch, tmp_path):
  hf_dir, _ = random_checkpoints
  nb = execute(REPO / "notebooks" / "convert_and_check.ipynb",
               {"POOLFORMER_SOURCE": str(hf_dir), "POOLFORMER_OUTPUT": str(tmp_path / "out")},
               monkeypatch)
  assert "top-1 agreement 100%" in outputs_text(nb)
  assert images_shown(nb) == 1
  assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.slow
def test_train_on_tpu_notebook_plots_a_real_run(monkeypatch, tmp_path, digits_data_dir):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  env = cpu_env(1)  # As on a laptop.
  subprocess.run([sys.executable, "main.py", "--config=configs/demo.py:smoke",
                  f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}"],
                 cwd=REPO, env=env, check=True, timeout=900)
  nb = execute(REPO / "notebooks" / "train_on_tpu.ipynb",
               {"POOLFORMER_WORKDIR": str(workdir)}, monkeypatch)
  text = outputs_text(nb)
  assert "final eval/top1" in text and "img/s/chip" in text
  assert images_shown(nb) == 1
