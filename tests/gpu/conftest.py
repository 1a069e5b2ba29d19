"""What the CUDA-only checks share: the tiny edit-v2 model, its config and one cached sample's shapes."""

import pytest
import torch

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from trainer.demo.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-edit-v2", flavour="edit-v2")


def config_for(tiny_model, **settings):
    from trainer.config.parsing import parse_train_config

    return parse_train_config(
        {"model_flavour": "edit-v2", "pretrained_model_name_or_path": str(tiny_model), "lora_rank": 4, **settings}
    )


def a_sample():
    """One cached sample's shapes (a 64 px target, one reference), random but fixed."""
    from trainer.data.caches import CachedSample
    from trainer.demo.tiny_model import JOINT_DIM, Z_DIM

    g = torch.Generator().manual_seed(0)
    return CachedSample(
        name="0000",
        prompt_embeds=torch.randn(12, JOINT_DIM, generator=g),
        prompt_embeds_mask=torch.ones(12, dtype=torch.long),
        target=torch.randn(Z_DIM, 8, 8, generator=g),
        references=[torch.randn(Z_DIM, 8, 8, generator=g)],
    )
