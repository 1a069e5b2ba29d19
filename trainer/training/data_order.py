"""Which sample, which caption and which reference a rank trains on at each micro-step.

Every choice is a pure function of (seed, micro-step, rank), so a resumed run sees exactly the
data order, dropout draws, σ and noise it would have seen.
"""

import numpy as np
import torch

from trainer.config.schema import TrainConfig
from trainer.data.caches import CachedSample, SamplePaths, sample_paths
from trainer.data.dataset_config import DatasetConfig


def training_samples(manifest, dataset_config: DatasetConfig, config: TrainConfig) -> list[tuple[str, SamplePaths]]:
    """One epoch's samples: each training row 1 + its dataset's `repeats` times."""
    samples = []
    for row in manifest[manifest["split"] == "train"].to_dict("records"):
        copies = 1 + dataset_config.by_id(row["dataset_id"]).repeats
        samples += [(row["name"], sample_paths(dataset_config, config, row))] * copies
    return samples



def micro_step_sample(micro_step: int, n_samples: int, seed: int, world: int, rank: int) -> int:
    """Which sample a rank trains on at a micro-step: a seeded permutation per epoch.

    A pure function of the step, so a resumed run sees exactly the data order it would have.
    """
    global_index = micro_step * world + rank
    epoch, position = divmod(global_index, n_samples)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return int(order[position])


def conditioning_for_step(sample: CachedSample, dropout_probability: float, generator: torch.Generator) -> CachedSample:
    """Caption dropout (instruction dropped, references kept) or, with `random` sampling, one reference.

    Each choice keeps prompt embeddings and references consistent: dropout embeddings were
    encoded with all references, so a dropped caption keeps them all.
    """
    drop = dropout_probability > 0 and float(torch.rand((), generator=generator)) < dropout_probability
    if drop and sample.dropout_embeds is not None:
        return sample.with_caption_dropped()
    if sample.per_reference_embeds is not None:
        return sample.with_one_reference(int(torch.randint(len(sample.references), (), generator=generator)))
    return sample


def micro_step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, micro_step, rank)) & 0x7FFF_FFFF_FFFF)


SHARED_RANK = -1  # micro_step_generator's stream that every rank draws alike
