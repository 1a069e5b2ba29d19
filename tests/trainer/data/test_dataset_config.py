"""The dataset config (`multidatabackend.json`, SPEC §4): entries, the links between them, and
the folders they resolve to.

Cross-entry mistakes (a misspelt id, a link to the wrong kind of entry, too many references for
the flavour) are caught when the file is loaded, all of them in one ConfigError.
"""

from pathlib import Path

import pytest

from trainer.data.dataset_config import load_dataset_config, parse_dataset_config
from trainer.errors import ConfigError
from trainer.model.flavours import FLAVOURS

V1, V2 = FLAVOURS["edit-v1"], FLAVOURS["edit-v2"]
BASE = Path("/project")


def edits(**fields) -> dict:
    """An edit (target) dataset whose references live in the 'reference' dataset."""
    return {"id": "edits", "type": "local", "instance_data_dir": "data/edited", "conditioning_data": ["reference"], **fields}


def reference(dataset_id: str = "reference", **fields) -> dict:
    return {"id": dataset_id, "type": "local", "dataset_type": "conditioning", "instance_data_dir": f"data/{dataset_id}", **fields}


def embeds(dataset_id: str = "edits-embeds", **fields) -> dict:
    return {"id": dataset_id, "type": "local", "dataset_type": "conditioning_image_embeds", **fields}


def parse(entries: list[dict], flavour=V1, base_dir: Path = BASE):
    return parse_dataset_config(entries, "multidatabackend.json", flavour, base_dir)


def problems(entries: list[dict], flavour=V1) -> str:
    """The message a user sees for `entries`; fails the test if they are accepted."""
    with pytest.raises(ConfigError) as info:
        parse(entries, flavour)
    message = str(info.value)
    assert message.startswith("multidatabackend.json"), "the error names the file"
    return message


# --- a sound config ---------------------------------------------------------------------------


def test_a_minimal_edit_v1_config_is_accepted():
    config = parse([edits(), reference()])
    assert [e.id for e in config.image_entries] == ["edits"]
    assert config.by_id("edits").conditioning_ids == ["reference"]


def test_conditioning_data_may_be_a_single_id_string():
    assert parse([edits(conditioning_data="reference"), reference()]).by_id("edits").conditioning_ids == ["reference"]


def test_an_edit_v2_dataset_takes_up_to_three_references_in_order():
    refs = ["reference", "swatch", "silhouette"]
    config = parse([edits(conditioning_data=refs), *(reference(r) for r in refs)], V2)
    tset = config.training_set(config.by_id("edits"), V2)
    assert [r.id for r in tset.references] == refs
    assert tset.reference_dirs == tuple(BASE / "data" / r for r in refs)
    assert tset.sampling == "combined"  # all references every step unless told otherwise


def test_conditioning_multidataset_sampling_chooses_how_references_are_used():
    refs = ["reference", "swatch"]
    for sampling in ("combined", "random"):
        config = parse([edits(conditioning_data=refs, conditioning_multidataset_sampling=sampling), *(reference(r) for r in refs)], V2)
        assert config.training_set(config.by_id("edits"), V2).sampling == sampling
    message = problems([edits(conditioning_data=refs, conditioning_multidataset_sampling="combine"), *(reference(r) for r in refs)], V2)
    assert "conditioning_multidataset_sampling='combine' is not valid: did you mean 'combined'?" in message


def test_text_embeds_entries_are_accepted_and_hold_the_edit_v2_prompt_cache():
    text = {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/te"}
    config = parse([edits(), reference(), text], V2)
    assert config.training_set(config.by_id("edits"), V2).text_cache_dir == BASE / "cache" / "te" / "edits"


def test_disabled_image_datasets_are_not_trained_or_checked():
    config = parse([edits(), reference(), edits(id="old", disabled=True, conditioning_data=["gone"])])
    assert [e.id for e in config.image_entries] == ["edits"]


def test_dash_dash_field_names_are_accepted():
    config = parse([edits(**{"--resolution": 512}), reference()])
    assert config.by_id("edits").resolution == 512


# --- cross-entry rules (_check_references) ---------------------------------------------------


def test_duplicate_ids_are_refused():
    message = problems([edits(), reference(), reference()])
    assert "id 'reference' is used by 2 entries; ids must be unique" in message


def test_a_misspelt_conditioning_id_is_named_with_the_closest_id():
    message = problems([edits(conditioning_data=["refrence"]), reference()])
    assert "entry 'edits': conditioning_data 'refrence' does not exist" in message
    assert "did you mean 'reference'?" in message


def test_conditioning_data_must_name_a_conditioning_dataset():
    message = problems([edits(conditioning_data=["edits-embeds"]), reference(), embeds()])
    assert "conditioning_data 'edits-embeds' has dataset_type 'conditioning_image_embeds', expected 'conditioning'" in message


def test_an_edit_dataset_without_references_is_refused():
    message = problems([edits(conditioning_data=None), reference()])
    assert "entry 'edits': an edit dataset needs conditioning_data" in message


def test_edit_v1_refuses_two_references_and_points_to_edit_v2():
    message = problems([edits(conditioning_data=["reference", "swatch"]), reference(), reference("swatch")], V1)
    assert "edit-v1 takes 1 conditioning dataset(s), got 2" in message
    assert "use model_flavour 'edit-v2'" in message


def test_edit_v2_refuses_four_references():
    refs = ["r1", "r2", "r3", "r4"]
    message = problems([edits(conditioning_data=refs), *(reference(r) for r in refs)], V2)
    assert "edit-v2 takes 1-3 conditioning dataset(s), got 4" in message


def test_conditioning_image_embeds_naming_no_entry_is_a_clear_error_naming_it():
    message = problems([edits(conditioning_image_embeds="edits-embedz"), reference(), embeds()])
    assert "entry 'edits': conditioning_image_embeds 'edits-embedz' does not exist" in message
    assert "did you mean 'edits-embeds'?" in message
    # with no entry at all, the message shows the entry to add
    message = problems([edits(conditioning_image_embeds="edits-embeds"), reference()])
    assert '"dataset_type": "conditioning_image_embeds"' in message and '"id": "edits-embeds"' in message


def test_conditioning_image_embeds_must_name_an_embeds_entry():
    message = problems([edits(conditioning_image_embeds="reference"), reference()])
    assert "conditioning_image_embeds 'reference' has dataset_type 'conditioning', expected 'conditioning_image_embeds'" in message


def test_conditioning_image_embeds_is_refused_for_edit_v2():
    message = problems([edits(conditioning_image_embeds="edits-embeds"), reference(), embeds()], V2)
    assert "conditioning_image_embeds is an edit-v1 cache" in message and "Remove the key" in message


def test_instanceprompt_needs_an_instance_prompt():
    message = problems([edits(caption_strategy="instanceprompt"), reference()])
    assert "caption_strategy 'instanceprompt' needs an instance_prompt" in message


def test_folders_are_required_for_image_and_conditioning_datasets():
    message = problems([edits(instance_data_dir=None), reference(instance_data_dir=None)])
    assert "entry 'edits': instance_data_dir is required" in message
    assert "entry 'reference': instance_data_dir is required" in message


def test_a_config_with_no_edit_dataset_is_refused():
    assert "no enabled dataset with dataset_type 'image'" in problems([reference()])


def test_every_cross_entry_problem_is_reported_at_once():
    message = problems([edits(conditioning_data=["refrence"], conditioning_image_embeds="nope"), reference(), reference()])
    assert "3 problem(s)" in message
    assert "'refrence' does not exist" in message and "'nope' does not exist" in message and "used by 2 entries" in message


@pytest.mark.parametrize(
    "field, bad, meant",
    [("dataset_type", "images", "image"), ("caption_strategy", "textfiles", "textfile"), ("resolution_type", "pixelarea", "pixel_area")],
)
def test_a_bad_field_value_names_the_entry_and_suggests_the_valid_one(field, bad, meant):
    message = problems([edits(**{field: bad}), reference()])
    assert "entry 0 (id 'edits')" in message
    assert f"{field}={bad!r} is not valid: did you mean {meant!r}?" in message


def test_an_unknown_field_is_named_with_the_closest_field():
    message = problems([edits(caption_stategy="textfile"), reference()])
    assert "unknown key 'caption_stategy': did you mean 'caption_strategy'?" in message


def test_the_file_must_hold_a_list_of_objects():
    with pytest.raises(ConfigError, match="expected a JSON list of dataset entries, got dict"):
        parse({"id": "edits"})
    with pytest.raises(ConfigError, match="entry 1: expected an object, got str"):
        parse([edits(), "reference"])


def test_two_image_datasets_may_not_share_a_cache_folder():
    eval_edits = edits(id="eval", instance_data_dir="data/eval/edited", conditioning_data=["eval-reference"])
    message = problems(
        [edits(cache_dir_vae="cache/vae"), reference(), {**eval_edits, "cache_dir_vae": "cache/vae"}, reference("eval-reference")],
        V2,
    )
    assert "cache/vae" in message and "'edits'" in message and "'eval'" in message


# --- where things live -----------------------------------------------------------------------


def test_edit_v1_prompt_embeds_cache_defaults_to_cache_conditioning_image_embeds_per_dataset():
    config = parse([edits(), reference()])
    tset = config.training_set(config.by_id("edits"), V1)
    assert tset.text_cache_dir == BASE / "cache" / "conditioning_image_embeds" / "edits"


def test_an_embeds_entry_without_cache_dir_uses_the_same_default():
    config = parse([edits(conditioning_image_embeds="edits-embeds"), reference(), embeds()])
    tset = config.training_set(config.by_id("edits"), V1)
    assert tset.text_cache_dir == BASE / "cache" / "conditioning_image_embeds" / "edits"


def test_an_embeds_entry_with_cache_dir_moves_the_edit_v1_cache_there():
    config = parse([edits(conditioning_image_embeds="edits-embeds"), reference(), embeds(cache_dir="/fast/embeds")])
    assert config.training_set(config.by_id("edits"), V1).text_cache_dir == Path("/fast/embeds")


def test_vae_cache_defaults_to_cache_vae_per_dataset_and_follows_cache_dir_vae():
    config = parse([edits(), reference(), edits(id="more", cache_dir_vae="latents/more")])
    assert config.training_set(config.by_id("edits"), V1).vae_cache_dir == BASE / "cache" / "vae" / "edits"
    assert config.training_set(config.by_id("more"), V1).vae_cache_dir == BASE / "latents" / "more"


def test_edit_v2_prompt_cache_defaults_to_cache_text_embeds_per_dataset():
    config = parse([edits(), reference()], V2)
    assert config.training_set(config.by_id("edits"), V2).text_cache_dir == BASE / "cache" / "text_embeds" / "edits"


def test_relative_paths_resolve_against_base_dir_and_absolute_paths_stay(tmp_path):
    config = parse([edits(instance_data_dir="data/edited"), reference(instance_data_dir="/elsewhere/refs")], base_dir=tmp_path)
    tset = config.training_set(config.by_id("edits"), V1)
    assert tset.target_dir == tmp_path / "data" / "edited"
    assert tset.reference_dirs == (Path("/elsewhere/refs"),)
    assert config.resolve("~/x") == Path.home() / "x"


def test_base_dir_defaults_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_dataset_config([edits(), reference()], "multidatabackend.json", V1)
    assert config.training_set(config.by_id("edits"), V1).target_dir == tmp_path.resolve() / "data" / "edited"


def test_a_file_with_comments_loads_and_errors_name_the_file(tmp_path):
    path = tmp_path / "multidatabackend.json"
    path.write_text(
        """// targets and their references
        [
          {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["reference"]},
          {"id": "reference", "dataset_type": "conditioning", "instance_data_dir": "data/reference"},  // trailing comma ok
        ]"""
    )
    assert load_dataset_config(path, V1, base_dir=tmp_path).by_id("reference").dataset_type == "conditioning"
    path.write_text('[{"id": "edits", "instance_data_dir": "d", "conditioning_data": ["x"]}]')
    with pytest.raises(ConfigError, match=f"{path}: 1 problem"):
        load_dataset_config(path, V1, base_dir=tmp_path)


def test_by_id_names_the_closest_id():
    config = parse([edits(), reference()])
    with pytest.raises(ConfigError, match="no dataset with id 'edit'; did you mean 'edits'"):
        config.by_id("edit")
