"""Recipe validation: every error names the key; bad layer lists are refused before any model loads."""

from pathlib import Path

import pytest

from edgerag.train.recipe import RecipeError, Recipe, load_recipe, parse_layers

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def tiny_generator_folder(tmp_path, layers=4):
    import json

    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return folder


@pytest.mark.parametrize("name", [p.relative_to(ROOT / "recipes").as_posix()
                                  for p in sorted((ROOT / "recipes").rglob("*.toml"))])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert isinstance(recipe, Recipe)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"student\.layer\b"):
        load_recipe(write(tmp_path, "[student]\nlayer = [0, 1]\n"), check_models=False)
    with pytest.raises(RecipeError, match="'bogus'"):
        load_recipe(write(tmp_path, "bogus = 1\n"), check_models=False)


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"distill_generator\.temperature: expected float, got str"):
        load_recipe(write(tmp_path, '[distill_generator]\ntemperature = "hot"\n'), check_models=False)
    with pytest.raises(RecipeError, match=r"teacher_finetune\.enabled: expected bool"):
        load_recipe(write(tmp_path, "[teacher_finetune]\nenabled = 1\n"), check_models=False)
    with pytest.raises(RecipeError, match=r"eval\.k: expected int, got bool"):
        load_recipe(write(tmp_path, "[eval]\nk = true\n"), check_models=False)
    with pytest.raises(RecipeError, match=r"distill_generator\.alpha"):
        load_recipe(write(tmp_path, "[distill_generator]\nalpha = 1.5\n"), check_models=False)
    with pytest.raises(RecipeError, match=r"student\.vocabulary: expected 'full' or 'corpus'"):
        load_recipe(write(tmp_path, '[student]\nvocabulary = "small"\n'), check_models=False)
    with pytest.raises(RecipeError, match=r"student\.passage_encoder"):
        load_recipe(write(tmp_path, '[student]\npassage_encoder = "both"\n'), check_models=False)
    with pytest.raises(RecipeError, match=r"student\.encoder_layers: 3 cuts the encoder"):
        load_recipe(write(tmp_path, '[student]\nquery_encoder = "teacher"\nencoder_layers = 3\n'), check_models=False)
    with pytest.raises(RecipeError, match=r"distill_general\.chunk_tokens: expected int"):
        load_recipe(write(tmp_path, '[distill_general]\nchunk_tokens = "128"\n'), check_models=False)


def test_ints_are_accepted_as_floats(tmp_path):
    r = load_recipe(write(tmp_path, "[distill_generator]\ntemperature = 2\n"), check_models=False)
    assert r.distill_generator.temperature == 2.0 and isinstance(r.distill_generator.temperature, float)


def test_layer_list_outside_depth_is_refused(tmp_path):
    gen = tiny_generator_folder(tmp_path, layers=4)
    ok = f'[teacher]\ngenerator = "{gen}"\n[student]\nlayers = [0, 3]\n'
    assert load_recipe(write(tmp_path, ok)).student.layers == [0, 3]
    bad = f'[teacher]\ngenerator = "{gen}"\n[student]\nlayers = [0, 4]\n'
    with pytest.raises(RecipeError, match=r"student\.layers: layers \[4\] are outside the teacher's depth \(0\.\.3\)"):
        load_recipe(write(tmp_path, bad))
    with pytest.raises(RecipeError, match=r"student\.layers: auto:9"):
        load_recipe(write(tmp_path, f'[teacher]\ngenerator = "{gen}"\n[student]\nlayers = "auto:9"\n'))


def test_layer_list_checked_against_the_real_teacher_gguf(tmp_path):
    # The packaged SmolLM2 has 30 layers; the depth is read from the GGUF header, no weights loaded.
    with pytest.raises(RecipeError, match=r"student\.layers: layers \[30\]"):
        load_recipe(write(tmp_path, "[student]\nlayers = [0, 30]\n"))
    with pytest.raises(RecipeError, match=r"student\.encoder_layers: 7 layers"):
        load_recipe(write(tmp_path, "[student]\nencoder_layers = 7\n"))


def test_parse_layers():
    assert parse_layers("all", 4, "x") == [0, 1, 2, 3]
    assert parse_layers(3, 6, "x") == [0, 2, 5] or parse_layers(3, 6, "x") == [0, 3, 5]
    assert parse_layers("auto:2", 4, "x") == "auto:2"
    with pytest.raises(RecipeError, match="listed twice"):
        parse_layers([1, 1], 4, "x")
    with pytest.raises(RecipeError, match="x: expected"):
        parse_layers("some", 4, "x")


def test_bad_toml_names_the_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[student\n"))


def test_fresh_distillation_questions_need_enough_train_questions(tmp_path):
    with pytest.raises(RecipeError, match=r"distill_generator\.questions: expected 'teacher' or 'fresh'"):
        load_recipe(write(tmp_path, '[distill_generator]\nquestions = "new"\n'), check_models=False)
    text = ('[data]\ntrain_questions = 300\n[teacher_finetune]\nexamples = 200\n'
            '[distill_generator]\nexamples = 150\nquestions = "fresh"\n')
    with pytest.raises(RecipeError, match=r"data\.train_questions \(300\) must be at least 350"):
        load_recipe(write(tmp_path, text), check_models=False)
    assert load_recipe(write(tmp_path, text.replace("300", "350")), check_models=False).distill_generator.questions == "fresh"
