"""Rank 0's progress reports: to Dagster through Pipes when Dagster launched us, else to stdout.

Only rank 0 may open Pipes (two ranks reporting fail the Dagster run); other ranks stay quiet.
Lines go through `tqdm.write`, so a progress bar on the terminal is redrawn below them instead of
being cut into fragments.
"""

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"


def write_line(message: str) -> None:
    import sys

    from tqdm.auto import tqdm

    tqdm.write(message)
    sys.stdout.flush()  # a launcher reading a pipe sees each line when it is said


class Reporter:
    def log(self, message: str) -> None:
        write_line(message)

    def replay(self, messages: Iterable[str]) -> None:
        """Messages printed before this reporter was open: only Dagster's event log still lacks them."""

    def materialization(self, metadata: Mapping[str, Any]) -> None:
        pass


class SilentReporter(Reporter):
    def log(self, message: str) -> None:
        pass


class PipesReporter(Reporter):
    def __init__(self, pipes):
        self.pipes = pipes

    def log(self, message: str) -> None:
        write_line(message)
        self.pipes.log.info(message)

    def replay(self, messages: Iterable[str]) -> None:
        for message in messages:
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
