"""The promotion rule alone: margin, direction, no champion yet, values that are not numbers."""

import math

import pytest

from trainer.config.parsing import parse_train_config
from trainer.errors import ConfigError
from trainer.tracking.promotion import CHALLENGER, CHAMPION, HIGHER_IS_BETTER, PromotionRule, decide

LOWER = PromotionRule("lora_latent_mse", higher_is_better=False, margin=0.0)
HIGHER = PromotionRule("lora_edit_success", higher_is_better=True, margin=0.5)


def test_no_champion_yet_the_new_version_takes_it():
    decision = decide(LOWER, 1.42, None)
    assert decision.promoted and decision.alias == CHAMPION and "no champion yet" in decision.reason


@pytest.mark.parametrize("new, promoted", [(1.40, True), (1.4199, True), (1.42, False), (1.43, False)])
def test_lower_is_better_with_no_margin_an_equal_value_keeps_the_champion(new, promoted):
    decision = decide(LOWER, new, 1.42)
    assert decision.promoted is promoted
    assert decision.alias == (CHAMPION if promoted else CHALLENGER)


@pytest.mark.parametrize("new, promoted", [(20.6, True), (20.5, False), (20.2, False), (19.0, False)])
def test_higher_is_better_must_beat_the_champion_by_more_than_the_margin(new, promoted):
    decision = decide(HIGHER, new, 20.0)  # margin 0.5: 20.5 is not enough
    assert decision.promoted is promoted
    assert ("not higher" in decision.reason) is (not promoted)
    assert "margin 0.5" in decision.reason


def test_the_direction_decides_which_way_better_is():
    assert decide(PromotionRule("m", True), 2.0, 1.0).promoted
    assert not decide(PromotionRule("m", False), 2.0, 1.0).promoted
    assert decide(PromotionRule("m", False, margin=0.5), 0.4, 1.0).promoted
    assert not decide(PromotionRule("m", False, margin=0.5), 0.6, 1.0).promoted


def test_a_value_that_is_not_a_number_never_takes_the_champion():
    assert not decide(LOWER, math.nan, 1.0).promoted
    assert not decide(LOWER, None, 1.0).promoted
    assert not decide(LOWER, math.nan, None).promoted  # not even when there is no champion
    assert decide(LOWER, 1.0, math.nan).promoted  # a champion without a usable value is replaced


def test_the_rule_comes_from_the_config_with_the_metrics_own_direction_by_default():
    assert PromotionRule.from_config(parse_train_config({})) == PromotionRule("lora_latent_mse", False, 0.0)
    rule = PromotionRule.from_config(parse_train_config({"promotion_metric": "lora_psnr", "promotion_margin": 0.25}))
    assert rule == PromotionRule("lora_psnr", True, 0.25) and rule.mlflow_key == "validation_lora_psnr"
    flipped = PromotionRule.from_config(parse_train_config({"promotion_metric": "lora_psnr", "promotion_direction": "lower"}))
    assert not flipped.higher_is_better


def test_directions_equal_the_validation_reports_own():
    from trainer.evaluation.metrics import HIGHER_IS_BETTER as REPORT

    assert HIGHER_IS_BETTER == {**REPORT, "latent_mse": False}


def test_registered_model_name_defaults_to_the_experiment_and_bad_keys_are_refused():
    assert parse_train_config({"tracker_project_name": "team/style:v2"}).model_registry_name == "team-style-v2"
    assert parse_train_config({"registered_model_name": "style-lora"}).model_registry_name == "style-lora"
    for raw, words in (
        ({"registered_model_name": "a/b"}, "registered_model_name"),
        ({"promotion_metric": "lora_psnrr"}, "did you mean 'lora_psnr'"),
        ({"promotion_margin": -0.1}, "promotion_margin"),
        ({"promotion_direction": "up"}, "promotion_direction"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_train_config(raw)
