"""Resources: which project (config + dataset config + root folder) the assets work on."""

import os
from pathlib import Path

import dagster as dg

DEFAULT_EXAMPLE = "qwen_image.edit-v2-lora"


class QwenEditProject(dg.ConfigurableResource):
    """A training config and dataset config; relative paths resolve against `root`."""

    root: str
    config_path: str
    data_path: str | None = None

    def load(self, overrides: dict | None = None):
        from trainer.workflow import load_project

        return load_project(Path(self.config_path), Path(self.data_path) if self.data_path else None, Path(self.root), overrides)


def project_from_env() -> QwenEditProject:
    """QWEN_EDIT_ROOT / QWEN_EDIT_CONFIG / QWEN_EDIT_DATA, defaulting to the bundled demo preset."""
    from trainer.workflow import example_paths

    example_config, example_data = example_paths(DEFAULT_EXAMPLE)
    config = os.environ.get("QWEN_EDIT_CONFIG")
    data = os.environ.get("QWEN_EDIT_DATA")
    return QwenEditProject(
        root=os.environ.get("QWEN_EDIT_ROOT", str(Path.cwd())),
        config_path=config or str(example_config),
        # a user's config names its own data_backend_config; the preset's data sits beside it
        data_path=data or (None if config else str(example_data)),
    )
