"""Asset values stored as JSON, never as pickles.

Dagster's default IO manager pickles each output under DAGSTER_HOME/storage and unpickles it for
the assets downstream, so a file planted there would run code. The only value our assets hand on
is the pairing manifest (a DataFrame): it is written as JSON records with the manifest's own
writer and read back with its reader; any other value is refused rather than pickled.
"""

from pathlib import Path

import dagster as dg
import pandas as pd


class ManifestIOManager(dg.ConfigurableIOManager):
    """DataFrames as `<storage>/json/<asset key>.json`; nothing else is stored."""

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        from trainer.data.pairing import write_manifest

        if obj is None:
            return
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: only DataFrames are stored (as JSON); got {type(obj).__name__}")
        write_manifest(obj, self._path(context.step_context.instance, context.asset_key))

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        from trainer.data.pairing import read_manifest

        return read_manifest(self._path(context.instance, context.asset_key))

    @staticmethod
    def _path(instance: dg.DagsterInstance, key: dg.AssetKey) -> Path:
        return Path(instance.storage_directory()) / "json" / Path(*key.path).with_suffix(".json")
