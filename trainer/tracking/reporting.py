"""Rank 0's progress reports: to Dagster through Pipes when Dagster launched us, else to stdout.

Only rank 0 may open Pipes (two ranks reporting fail the Dagster run); other ranks stay quiet.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"


class Reporter:
    def log(self, message: str) -> None:
        print(message, flush=True)

    def materialization(self, metadata: Mapping[str, Any]) -> None:
        pass


class SilentReporter(Reporter):
    def log(self, message: str) -> None:
        pass


class PipesReporter(Reporter):
    def __init__(self, pipes):
        self.pipes = pipes

    def log(self, message: str) -> None:
        print(message, flush=True)
        self.pipes.log.info(message)

    def materialization(self, metadata: Mapping[str, Any]) -> None:
        self.pipes.report_asset_materialization(metadata=dict(metadata))


@contextmanager
def open_reporter(is_main_process: bool) -> Iterator[Reporter]:
    import os

    if not is_main_process:
        yield SilentReporter()
    elif os.environ.get(PIPES_ENV):
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            yield PipesReporter(pipes)
    else:
        yield Reporter()
