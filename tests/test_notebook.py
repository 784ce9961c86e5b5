"""notebooks/quickstart.ipynb runs end to end (nbclient) on a converted random-weight HF model
(tests/test_evaluate.py runs it on a training workdir)."""

import json
import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DDETR_WORKDIR", str(tmp_path))
    monkeypatch.delenv("DDETR_CHECKPOINT", raising=False)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # faster compiles, same results
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "compilations: 1" in text  # four image sizes, one padded batch
    assert "AP50" in text and "ellipse" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the drawn detections and the attention plot
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 4 * 100 and {"image_id", "category_id", "bbox", "score"} <= set(
        results[0])
    assert (tmp_path / "converted" / "model_config.json").exists()
