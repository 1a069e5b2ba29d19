"""`report.html` shows captions, names and paths as text, never as markup (issue 18 §4).

The report is logged to MLflow and opened in browsers; a caption or a file name from a dataset
used to be pasted in raw, so `<script>` in a caption ran in the MLflow UI.
"""

from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import write_small_project
from trainer.evaluation.validation import ValidationRow, run_validation, write_html
from trainer.config.parsing import parse_train_config
from trainer.workflow import check_data, load_project

CAPTION = "<script>alert(1)</script> make it <b>blue</b> & \"bright\""
NAME = 'a"<b>x'  # a file name with a quote and a tag opener


class Page(HTMLParser):
    """The tags, image sources and text a browser would see."""

    def __init__(self):
        super().__init__()
        self.tags, self.sources, self.files, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
            self.files.append(dict(attrs)["alt"])  # the report embeds its images; alt names the file beside it

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_captions_names_and_paths_are_text_in_the_report(tmp_path):
    out = tmp_path / "validation"
    (out / "images").mkdir(parents=True)
    image = out / "images" / f"{NAME}_base.png"
    image.write_bytes(b"")
    row = ValidationRow(NAME, CAPTION, references=[str(image)], target="", base_image=str(image), metrics={"base_psnr": 1.0})
    config = parse_train_config({"pretrained_model_name_or_path": "models/<img src=x onerror=alert(2)>"})
    page = parse(write_html([row], out / "report.html", config, "eval", {"base_psnr": 1.0}).read_text())
    assert "script" not in page.tags and page.tags.count("img") == 2  # the two images of the row, no injected one
    text = "".join(page.text)
    assert CAPTION in text and NAME in text and "models/<img src=x onerror=alert(2)>" in text
    assert [out / name for name in page.files] == [image, image]
    assert all(src.startswith("data:image/png;base64,") for src in page.sources)


@pytest.mark.slow
def test_a_validation_run_on_hostile_names_and_captions_writes_a_safe_report(demo_root, tmp_path):
    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models", n_train=1, n_eval=1)
    eval_dir = tmp_path / "data" / "eval"
    for image in eval_dir.glob("*/0000.png"):
        image.rename(image.with_name(f"{NAME}.png"))
    (eval_dir / "edited" / "0000.txt").unlink()
    (eval_dir / "edited" / f"{NAME}.txt").write_text(CAPTION)
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    report = run_validation(project.config, manifest, None, project.validation_dir)

    page = parse(report.html_path.read_text())
    assert "script" not in page.tags and "b" not in page.tags
    assert CAPTION in "".join(page.text)
    sources = [project.validation_dir / name for name in page.files]
    assert sources and all(path.is_file() and NAME in path.name for path in sources)
