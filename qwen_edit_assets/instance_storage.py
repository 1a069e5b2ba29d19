"""Dagster's PostgreSQL storage, with the reachability check of `qwen_edit_assets.instance_check` first.

`dagster_home/dagster.postgres.yaml` names this class (`storage: custom:`), so every Dagster process that
opens the instance (`dagster asset materialize`, `dagster dev`, its webserver and daemon, run workers) says in
one line which database it cannot reach and what to do, instead of retrying five times and printing a
traceback. Past the check it is `DagsterPostgresStorage` itself, with the same config.
"""

import os

import yaml
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import pg_url_from_config

from qwen_edit_assets.instance_check import check_reachable, env_names


class CheckedPostgresStorage(DagsterPostgresStorage):
    @classmethod
    def from_config_value(cls, inst_data, config_value):
        raw = yaml.safe_load(inst_data.config_yaml) if inst_data else {}  # before env resolution: the variables' names
        home = os.environ.get("DAGSTER_HOME")
        check_reachable(pg_url_from_config(config_value), f"{home}/dagster.yaml" if home else "DAGSTER_HOME unset",
                        env_names(raw or {}))
        return super().from_config_value(inst_data, config_value)
