"""Metadata the Dagster UI shows without clicks: rounded floats, sizes in MB, the validation edits as a table
with column headers and each pair's instruction (issue 16 §7)."""

import re

import dagster as dg
from PIL import Image

from qwen_edit_assets.metadata import readable, rounded, validation_grid_markdown
from trainer.evaluation.validation import ValidationRow


def test_floats_are_rounded_to_four_significant_digits_and_bytes_become_megabytes():
    assert rounded(1.276634) == 1.277 and rounded(5.12345e-05) == 5.123e-05 and rounded(1234.5678) == 1235.0
    assert rounded(0.0) == 0.0
    shown = readable({"final_loss_mean_last_10pct": dg.MetadataValue.float(1.2766348), "steps": dg.MetadataValue.int(80),
                      "lora_bytes": dg.MetadataValue.int(2_345_678), "lora_path": "x", "train_seconds": 12.3456})
    assert shown["final_loss_mean_last_10pct"].value == 1.277 and shown["train_seconds"].value == 12.35
    assert shown["steps"].value == 80 and shown["lora_path"] == "x"
    assert "lora_bytes" not in shown and shown["lora_size_mb"].value == 2.35


def test_the_validation_grid_has_headers_and_the_instruction_on_each_row(tmp_path):
    def image(name, colour):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        return str(path)

    rows = [
        ValidationRow("0000", "make the square blue", [image("r1", "red"), image("r2", "green")], image("t", "blue"),
                      image("b", "gray"), image("l", "navy")),
        ValidationRow("validation_prompt", "make it *pink* | now", [image("r3", "red")], "", image("b2", "gray"), image("l2", "pink")),
    ]
    lines = validation_grid_markdown(rows).splitlines()
    assert lines[0] == "| pair | instruction | reference 1 | reference 2 | base | LoRA | target |"
    assert lines[1].count("---") == 7
    assert lines[2].startswith("| 0000 | make the square blue | ![reference 1](data:image/png;base64,")
    assert len(re.findall(r"data:image/png;base64,", lines[2])) == 5
    # the user's own instruction: escaped (no emphasis, no extra cell), no target, one reference
    assert lines[3].startswith(r"| validation\_prompt | make it \*pink\* \| now | ![reference 1](")
    assert lines[3].count("data:image") == 3 and lines[3].endswith("|  |")


def test_the_pairs_table_shows_each_instruction_and_base_against_lora():
    from qwen_edit_assets.metadata import validation_table

    rows = [ValidationRow("0000", "make the square blue", ["r.png"], "t.png", "b.png", "l.png",
                          {"base_latent_mse": 1.23456, "lora_latent_mse": 0.98765, "base_pixel_shift": 3.0}),
            ValidationRow("validation_prompt", "make it pink", ["r.png"], "", "b.png", "l.png")]
    table = validation_table(rows)
    assert [c.name for c in table.schema.columns] == ["pair", "instruction", "references", "base latent_mse", "LoRA latent_mse"]
    assert table.records[0].data == {"pair": "0000", "instruction": "make the square blue", "references": 1,
                                     "base latent_mse": 1.235, "LoRA latent_mse": 0.9877}
    assert table.records[1].data["instruction"] == "make it pink" and table.records[1].data["LoRA latent_mse"] is None
