"""The example notebook: stored without outputs, and run headless from top to bottom without an error."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "examples" / "transfer_learning.ipynb"


def test_the_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 10
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    text = "\n".join("".join(c["source"]) for c in code)
    for step in ("check_image_folder", "preview", "extract_features", "Head(", "compare_sklearn", "feature_map",
                 "plot_curves", "evaluate_model", ".predict(", ".save(", "Head.load"):
        assert step in text, step
    # every run made a transfer-notebook-runs-* folder in /tmp and left it there: the last cell removes it
    assert "shutil.rmtree(RUNS)" in "".join(code[-1]["source"])


@pytest.mark.parametrize("shared", [True, False])
def test_the_notebooks_runs_folder_goes_even_when_a_cell_fails(tmp_path, shared):
    """The first cell's temporary RUNS folder is removed when the kernel stops, not only by the last cell: a
    failed cell (or a missing ../shared, asserted in the first cell itself) left a transfer-notebook-runs-*
    folder in /tmp at every run. The first cell runs in a project with the shared paths present (empty) or
    absent, then a cell fails; the process ends as a kernel does."""
    project = tmp_path / "top" / "project"
    (project / "examples").mkdir(parents=True)
    (project / "setup.cfg").write_text("")
    (project / "pipeline").symlink_to(ROOT / "pipeline", target_is_directory=True)
    if shared:
        for d in ("data/catsdogs", "data/catsdogs_test", "weights/vgg16_features_imagenet.pt"):
            (tmp_path / "top" / "shared" / d).mkdir(parents=True)
    nb = json.loads(NOTEBOOK.read_text())
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    runs_tmp = tmp_path / "tmp"
    runs_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(runs_tmp), "TRANSFER_CACHE_DIR": str(tmp_path / "features")}
    r = subprocess.run([sys.executable, "-c", first + "\nraise RuntimeError('a later cell failed')"],
                       cwd=project / "examples", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and ("a later cell failed" if shared else "is missing") in r.stderr, r.stderr
    assert ("runs go to " in r.stdout) == shared
    assert list(runs_tmp.iterdir()) == []


@pytest.mark.slow
@pytest.mark.xdist_group("readme")  # the notebook reuses the README example's cache
def test_the_notebook_runs_clean(shared_available, scratch_project, monkeypatch):
    """Every cell runs (a failing cell fails the test, naming it), the figures come out as PNGs, and the
    numbers are the lesson's. Caches go to the scratch project's features/ (TRANSFER_CACHE_DIR), where the
    README example's run left the same 800-photo cache."""
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(scratch_project / "features"))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if importlib.util.find_spec("ipykernel") is None:  # not imported here: this process is no kernel
        pytest.skip("ipykernel is not installed")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.time()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the cell and the traceback, without the noise
        pytest.fail(f"a cell of {NOTEBOOK.name} failed:\n{str(e)[-3000:]}")
    seconds = time.time() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(pngs) >= 5  # preview, curves, feature map, confusion matrix, gallery: inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "1000 files: 1000 good, 0 unusable" in text
    assert float(re.search(r"val acc (\S+),", text).group(1)) >= 0.95
    assert float(re.search(r"accuracy (\S+) on 400 test photos", text).group(1)) >= 0.93
    assert "cat.650.jpg: Cat" in text and "dog.650.jpg: Dog" in text
    runs = Path(re.search(r"runs go to (.+)", text).group(1))
    assert runs.name.startswith("transfer-notebook-runs-") and not runs.exists()  # the last cell removed it
    print(f"{NOTEBOOK.name} ran in {seconds:.0f} s")
