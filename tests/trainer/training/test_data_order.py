"""The data order: which sample each rank trains on at each micro-step."""

import itertools
from collections import Counter

import pytest

from trainer.config.parsing import parse_train_config
from trainer.training.data_order import micro_step_sample


def _draws(steps: int, n_samples: int, world: int, accumulation: int, seed: int = 0) -> list[int]:
    """Every sample index drawn, in global order (micro-step, then rank), as the recipe's loop draws them."""
    return [
        micro_step_sample(micro, n_samples, seed, world, rank)
        for micro in range(steps * accumulation)
        for rank in range(world)
    ]


@pytest.mark.parametrize("seed", [0, 7])
def test_each_epoch_shows_every_sample_exactly_once_for_any_world_size_and_accumulation(seed):
    """Exhaustive over small cases: consecutive blocks of n_samples global draws are permutations."""
    for n_samples, world, accumulation in itertools.product(range(1, 12), range(1, 5), range(1, 5)):
        epochs = 3
        steps = -(-epochs * n_samples // (world * accumulation))
        draws = _draws(steps, n_samples, world, accumulation, seed)[: epochs * n_samples]
        for epoch in range(epochs):
            block = draws[epoch * n_samples:(epoch + 1) * n_samples]
            assert sorted(block) == list(range(n_samples)), (n_samples, world, accumulation, epoch)


def test_the_epochs_steps_show_each_sample_once_per_epoch_on_any_number_of_processes():
    """num_train_epochs: the resolved steps are the fewest that draw each sample `epochs` times,
    whatever the number of processes: 10 samples, 1 epoch, 2 processes is 5 steps, not 10."""
    assert parse_train_config({"num_train_epochs": 1}).resolved_max_train_steps(10, world_size=2) == 5
    for n_samples, world, accumulation, epochs in itertools.product(range(1, 10), range(1, 5), range(1, 4), range(1, 3)):
        config = parse_train_config({"num_train_epochs": epochs, "gradient_accumulation_steps": accumulation})
        steps = config.resolved_max_train_steps(n_samples, world_size=world)
        draws = _draws(steps, n_samples, world, accumulation)
        case = (n_samples, world, accumulation, epochs)
        assert Counter(draws[: epochs * n_samples]) == {i: epochs for i in range(n_samples)}, case
        assert len(draws) - epochs * n_samples < world * accumulation, case  # the last step only rounds up


def test_max_train_steps_is_not_scaled_by_the_world_size():
    assert parse_train_config({"max_train_steps": 7}).resolved_max_train_steps(10, world_size=4) == 7


def test_ranks_draw_different_samples_in_the_same_micro_step():
    for micro in range(10):
        drawn = [micro_step_sample(micro, 8, 0, 4, rank) for rank in range(4)]
        assert len(set(drawn)) == 4
