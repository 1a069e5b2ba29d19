"""The UIs in headless Chromium, as a user sees them: Dagster's asset graph, trained_lora's page (with its
MLflow link), the validation edits with their headers and instructions, pairing_manifest's checks; MLflow's
experiment (opening on its runs) and run page (name, description linking the Dagster run, dataset).

Screenshots are kept under test-artifacts/integration/.
"""

import tempfile
import urllib.parse
from pathlib import Path

import pytest

from tests.integration.servers import MlflowServer, free_port
from tests.integration.webdriver import Browser

pytestmark = pytest.mark.integration

ASSETS_QUERY = "{ assetNodes { assetKey { path } groupName } }"


@pytest.fixture(scope="module")
def browser(artifacts_dir):
    with tempfile.TemporaryDirectory(prefix="qwen-edit-browser-") as workdir:
        session = Browser(free_port(), Path(workdir))
        try:
            yield session
        finally:
            session.close()


def _anchor_hrefs(browser) -> list[str]:
    return browser.script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);")


def _node_labels(browser) -> list[str]:
    return browser.script("return Array.from(document.querySelectorAll('[class*=\"AssetNode_assetName\"]')).map(e => e.innerText.trim());")


def _labels(name: str, label: str) -> bool:
    """A node's label is the key's last part, long ones shortened in the middle ("demo_ev…_reference")."""
    head, cut, tail = label.partition("…")
    return label == name or (bool(cut) and name.startswith(head) and name.endswith(tail))


def test_asset_graph_shows_every_asset(dagster_ui, materialised, browser, artifacts_dir):
    nodes = dagster_ui.graphql(ASSETS_QUERY)["assetNodes"]
    groups = sorted({n["groupName"] for n in nodes})
    expanded = ",".join(f"global@global:{group}" for group in groups)  # every group open, not folded into one box
    browser.get(f"{dagster_ui.ui.url}/asset-groups?{urllib.parse.urlencode({'expanded': expanded})}")
    labels = browser.wait_for(lambda b: len(found := _node_labels(b)) >= len(nodes) and found,
                              f"{len(nodes)} asset nodes in the graph")
    names = [n["assetKey"]["path"][-1] for n in nodes]
    unmatched = [name for name in names if not any(_labels(name, label) for label in labels)]
    assert not unmatched and len(labels) == len(names), (unmatched, labels)
    text = browser.text()
    for name in ("pairing_manifest", "text_embeds", "vae_latents", "trained_lora", "validation_report", *groups):
        assert name in text
    browser.screenshot(artifacts_dir / "asset-graph.png")


def test_trained_lora_page_shows_its_metadata_and_mlflow_link(dagster_ui, trained_lora_metadata, browser, artifacts_dir):
    browser.get(f"{dagster_ui.ui.url}/assets/trained_lora")
    url = trained_lora_metadata["mlflow_run_url"]
    browser.wait_for(lambda b: url in _anchor_hrefs(b), f"a link to the MLflow run {url}")
    text = browser.text()
    for label in ("lora_path", "mlflow_run_url", "final_loss_mean_last_10pct", "lora_size_mb", "run_name", "steps"):
        assert label in text
    assert trained_lora_metadata["lora_path"] in text
    neighbours = ("text_embeds", "vae_latents", "validation_report")  # lineage on the page (rendered after the metadata)
    browser.wait_for(lambda b: all(n in b.text() for n in neighbours), "the upstream and downstream assets")
    browser.script("const a = Array.from(document.querySelectorAll('a[href]')).find(a => a.href === arguments[0]);"
                   "(a.closest('tr') || a).scrollIntoView({block: 'center'});", url)  # the MLflow row in the screenshot
    browser.screenshot(artifacts_dir / "trained_lora.png")


def _images(browser) -> list[str]:
    return browser.script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).map(i => i.src);")


def test_validation_report_page_shows_the_edits_with_headers_and_instructions(dagster_ui, materialised, browser, artifacts_dir):
    eval_captions = sorted(p.read_text().strip() for p in (dagster_ui.root / "demo" / "data" / "eval" / "edited").glob("*.txt"))
    browser.get(f"{dagster_ui.ui.url}/assets/validation_report")
    # inline, no click: the pairs table, each row with its instruction and base vs LoRA
    browser.wait_for(lambda b: "pairs_table" in b.text() and "LoRA latent_mse" in b.text(), "the pairs table")
    text = browser.text()
    for caption in eval_captions:
        assert caption in text, caption
    browser.script("const h = Array.from(document.querySelectorAll('th')).find(e => e.innerText.trim() === 'instruction');"
                   "if (h) h.scrollIntoView({block: 'start'});")
    browser.screenshot(artifacts_dir / "validation_report.png")
    # one click: the edits themselves, under column headers, the instruction on each row
    clicked = browser.script(
        "const row = Array.from(document.querySelectorAll('tr')).find(r => r.innerText.trim().startsWith('edits'));"
        "const link = row && Array.from(row.querySelectorAll('*')).find(e => e.children.length === 0 && e.innerText.trim() === '[Show Markdown]');"
        "if (link) { link.click(); return true; } return false;")
    assert clicked, "no [Show Markdown] on the edits row"
    browser.wait_for(lambda b: all(h in b.text() for h in ("reference 1", "base", "LoRA", "target")), "the edits' column headers")
    rendered = browser.wait_for(lambda b: [src for src in _images(b) if src.startswith("data:image/png")], "the edits' images")
    assert len(rendered) >= len(eval_captions) * 4  # reference(s), base, LoRA, target per row, all decoded
    browser.screenshot(artifacts_dir / "validation_edits.png")


def test_pairing_manifest_checks_tab_shows_both_checks_evaluated(dagster_ui, materialised, browser, artifacts_dir):
    browser.get(f"{dagster_ui.ui.url}/assets/pairing_manifest?view=checks")
    browser.wait_for(lambda b: "pairs_complete" in b.text() and "no_orphan_references" in b.text(), "the two checks")
    assert "Execution failed" not in browser.text()
    browser.screenshot(artifacts_dir / "pairing_manifest_checks.png")


@pytest.fixture(scope="module")
def mlflow_ui(dagster_ui, tmp_path_factory):
    """An MLflow UI over the store the Dagster session's runs logged to."""
    server = MlflowServer(dagster_ui.mlflow_uri, tmp_path_factory.mktemp("mlflow-ui"))
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_opens_the_experiment_on_its_runs_and_the_run_page_says_what_it_is(
    dagster_ui, materialised, trained_lora_metadata, mlflow_ui, browser, artifacts_dir
):
    from mlflow.tracking import MlflowClient

    from trainer.tracking.store import experiment_url, run_url

    run = MlflowClient(dagster_ui.mlflow_uri).get_run(trained_lora_metadata["mlflow_run_id"])
    experiment = run.info.experiment_id
    browser.get(experiment_url(mlflow_ui.url, experiment))  # the link the project writes: the model-training view
    browser.wait_for(lambda b: run.info.run_name in b.text(), f"the run {run.info.run_name} listed (the runs view, not traces)", 90)
    browser.screenshot(artifacts_dir / "mlflow_experiment.png")

    browser.get(run_url(mlflow_ui.url, experiment, run.info.run_id))
    browser.wait_for(lambda b: "Trained by Dagster run" in b.text(), "the run's description", 90)
    dagster_run = f"{dagster_ui.ui.url}/runs/{materialised['runId']}"
    assert dagster_run in _anchor_hrefs(browser)
    text = browser.text()
    assert run.info.run_name in text and "pairing_manifest" in text  # its name; its dataset input
    browser.screenshot(artifacts_dir / "mlflow_run.png")
