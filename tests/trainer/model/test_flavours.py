"""The flavour table: one entry per Literal value; an unknown name is a ConfigError with the fix."""

import pytest

from trainer.errors import ConfigError
from trainer.model.flavours import FLAVOURS, FlavourName, get_flavour


def test_the_table_holds_every_flavour_name():
    assert tuple(FLAVOURS) == FlavourName.__args__
    assert all(get_flavour(name).name == name for name in FLAVOURS)


def test_an_unknown_flavour_is_a_config_error_naming_the_closest_one():
    with pytest.raises(ConfigError) as refused:
        get_flavour("edit-v4")
    message = str(refused.value)
    assert "unknown model_flavour 'edit-v4'" in message and "did you mean" in message
    assert "Set model_flavour to one of these" in message
