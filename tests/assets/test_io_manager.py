"""The manifest reaches downstream assets as JSON: nothing Dagster stores is unpickled.

Dagster's default IO manager would pickle the pairing manifest under DAGSTER_HOME/storage and
unpickle it for every downstream asset; a pickle planted there would run code.
"""

import pickle

import dagster as dg
import pandas as pd
import pytest

from qwen_edit_assets.definitions import build_definitions
from qwen_edit_assets.io_managers import ManifestIOManager
from qwen_edit_assets.resources import QwenEditProject
from trainer.data.pairing import REFERENCE_COLUMNS


def _manifest() -> pd.DataFrame:
    return pd.DataFrame([{"name": "0001", "split": "train", "caption": "make it blue", **{c: None for c in REFERENCE_COLUMNS}}])


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_the_manifest_is_stored_as_json_and_a_planted_pickle_never_runs(tmp_path):
    received = []

    @dg.asset
    def pairing_manifest() -> pd.DataFrame:
        return _manifest()

    @dg.asset
    def consumer(pairing_manifest: pd.DataFrame) -> None:
        received.append(pairing_manifest)

    defs = dg.Definitions(assets=[pairing_manifest, consumer], resources={"io_manager": ManifestIOManager()})
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert job.execute_in_process(instance=instance).success
        storage = tmp_path / "storage"
        stored = sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file() and "compute_logs" not in p.parts)
        assert stored == ["json/pairing_manifest.json"]  # no pickle beside it (the run's compute logs aside)
        marker = tmp_path / "payload-ran"
        (storage / "pairing_manifest").write_bytes(pickle.dumps(Payload(marker)))  # where the default one reads
        subset = job.get_subset(asset_selection={dg.AssetKey("consumer")})
        assert subset.execute_in_process(instance=instance).success
    assert not marker.exists()
    assert len(received) == 2 and received[1].to_dict("records") == _manifest().to_dict("records")


def test_values_other_than_dataframes_are_refused_not_pickled(tmp_path):
    @dg.asset
    def something() -> dict:
        return {"a": 1}

    defs = dg.Definitions(assets=[something], resources={"io_manager": ManifestIOManager()})
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    assert not list((tmp_path / "storage").rglob("something*"))


def test_the_code_location_uses_it(tmp_path):
    from trainer.workflow import example_paths

    config, data = example_paths("qwen_image.edit-v2-lora")
    defs = build_definitions(QwenEditProject(root=str(tmp_path), config_path=str(config), data_path=str(data)))
    assert isinstance(defs.resources["io_manager"], ManifestIOManager)
