"""Every QwenEditError reaches the user as one `error:` message and exit status 2, never a traceback:
through the `qwen-edit` console script, `python -m trainer.cli` and the accelerate entry point
`python -m trainer.train` alike (issue 15 §5, issue 18 §8)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

QWEN_EDIT = Path(sys.executable).parent / "qwen-edit"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_clean_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for name in named:
        assert name in result.stderr, result.stderr


def write(root: Path, config: dict | bytes) -> Path:
    (root / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},
    ]))
    return root / "config.json"


CASES = {
    "not UTF-8": (b'{"learning_rate": 1e-4 /* \xff */}', [], "not UTF-8"),
    "Infinity": (b'{"learning_rate": Infinity}', [], "learning_rate"),
    "dotted override into a number": ({"learning_rate": 1e-4}, ["--set", "learning_rate.x=1"], "'learning_rate' is 0.0001"),
    "300-character output_dir": ({"output_dir": "o" * 300}, [], "output_dir"),
    "dataset id escaping the cache folder": ({}, ["--data", "escaping.json"], "'../../x'"),
}


@pytest.mark.parametrize("case", CASES)
def test_qwen_edit_check_turns_bad_input_into_one_error_line(tmp_path, case):
    config, extra, named = CASES[case]
    write(tmp_path, config)
    (tmp_path / "escaping.json").write_text(json.dumps([
        {"id": "../../x", "instance_data_dir": "data/edited", "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},
    ]))
    data = [] if "--data" in extra else ["--data", "multidatabackend.json"]
    assert_one_clean_error(run([str(QWEN_EDIT), "check", "--config", "config.json", *data, *extra], tmp_path), named)


@pytest.mark.slow  # trainer.train imports torch and diffusers before it parses anything: ~30 s on a busy machine
def test_the_accelerate_entry_point_turns_bad_input_into_one_error_line(tmp_path):
    config, extra, named = CASES["dotted override into a number"]
    write(tmp_path, config)
    command = [sys.executable, "-m", "trainer.train", "--config", "config.json", "--data", "multidatabackend.json",
               "--manifest", "manifest.json", "--project-root", str(tmp_path), *extra]
    assert_one_clean_error(run(command, tmp_path), named)


def test_the_console_script_is_the_cli_main():
    assert "from trainer.cli import main" in QWEN_EDIT.read_text()
    assert 'qwen-edit = "trainer.cli:main"' in (REPO / "pyproject.toml").read_text()
