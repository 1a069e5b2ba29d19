"""The Dagster UI in headless Chromium: the asset graph and trained_lora's page (with its MLflow link) render.

Screenshots are kept under test-artifacts/integration/.
"""

import tempfile
import urllib.parse
from pathlib import Path

import pytest

from tests.integration.servers import free_port
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
    for label in ("lora_path", "mlflow_run_url", "final_loss", "steps"):
        assert label in text
    assert trained_lora_metadata["lora_path"] in text
    for neighbour in ("text_embeds", "vae_latents", "validation_report"):  # lineage on the page
        assert neighbour in text
    browser.script("const a = Array.from(document.querySelectorAll('a[href]')).find(a => a.href === arguments[0]);"
                   "(a.closest('tr') || a).scrollIntoView({block: 'center'});", url)  # the MLflow row in the screenshot
    browser.screenshot(artifacts_dir / "trained_lora.png")
