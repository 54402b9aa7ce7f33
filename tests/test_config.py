import pytest
import yaml

from alignpipe import AlignpipeError
from alignpipe.config import load_recipe


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_quickstart_loads():
    recipe = load_recipe()
    assert recipe.name == "quickstart" and recipe.model is None
    assert [t.name for t in recipe.optimization.objectives] == ["dpo", "sft"]


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(AlignpipeError, match=r"synthesis\.temprature: Extra inputs are not permitted"):
        load_recipe(_write(tmp_path, "synthesis:\n  temprature: 0.7\n"))


def test_bad_value_names_its_path(tmp_path):
    with pytest.raises(AlignpipeError, match=r"synthesis\.samples_per_prompt"):
        load_recipe(_write(tmp_path, "synthesis:\n  samples_per_prompt: 0\n"))
    with pytest.raises(AlignpipeError, match=r"task\.arithmetic\.ops"):
        load_recipe(_write(tmp_path, "task:\n  kind: arithmetic\n  ops: ['/']\n"))


def test_unknown_objective_and_parameter(tmp_path):
    with pytest.raises(AlignpipeError, match=r"unknown objective 'dop'"):
        load_recipe(_write(tmp_path, "optimization:\n  objectives: [{name: dop}]\n"))
    with pytest.raises(AlignpipeError, match=r"objective 'dpo' has no parameter \['bta'\]"):
        load_recipe(_write(tmp_path, "optimization:\n  objectives: [{name: dpo, bta: 0.1}]\n"))


def test_objective_must_match_instance_kind(tmp_path):
    with pytest.raises(AlignpipeError, match=r"objective 'grpo' trains on group examples"):
        load_recipe(_write(tmp_path, "optimization:\n  objectives: [{name: grpo}]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(AlignpipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(AlignpipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "a: [1,\n"))
    with pytest.raises(AlignpipeError, match="a recipe is a YAML mapping"):
        load_recipe(_write(tmp_path, "- 1\n"))


def test_overrides_apply_and_validate():
    assert load_recipe(None, {"rounds": 2, "synthesis.temperature": 0.5}).synthesis.temperature == 0.5
    with pytest.raises(AlignpipeError, match="rounds"):
        load_recipe(None, {"rounds": 0})


def test_objectives_doc_is_generated_from_the_registry():
    from pathlib import Path

    from alignpipe.optimization.objectives import objectives_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "objectives.md"
    assert doc.read_text() == objectives_markdown(), "run: alignpipe objectives --markdown > docs/objectives.md"


def test_recipe_asking_for_inputs_the_examples_lack_fails_at_load(tmp_path, monkeypatch):
    from alignpipe.optimization.objectives import OBJECTIVES, ObjectiveSpec

    # every registered objective may have a provider by now: register one reading a tensor nothing builds
    spec = ObjectiveSpec("needs_unbuilt", OBJECTIVES["dpo"].fn, "dpo", ("pair",), "", ("chosen_logps", "unbuilt"))
    monkeypatch.setitem(OBJECTIVES, "needs_unbuilt", spec)
    path = tmp_path / "r.yaml"
    path.write_text("optimization:\n  objectives: [{name: needs_unbuilt}]\n")
    with pytest.raises(AlignpipeError, match=r"objective 'needs_unbuilt' needs unbuilt, which pair examples"):
        load_recipe(path)
    path.write_text("instantiation: {kind: group}\noptimization:\n  objectives: [{name: kto}]\n")
    with pytest.raises(AlignpipeError, match=r"objective 'kto' trains on point examples"):
        load_recipe(path)


def test_builtin_recipes_all_load(tiny_model_path, tmp_path, monkeypatch):
    from pathlib import Path

    import alignpipe

    for path in (Path(alignpipe.__file__).parent / "recipes").glob("*.yaml"):
        if path.stem == "distill":  # its teacher is the quickstart run's model, which a fresh checkout lacks
            with monkeypatch.context() as m:
                m.chdir(tmp_path)  # runs/ is relative to where alignpipe runs
                with pytest.raises(AlignpipeError, match=r"synthesis: .*runs/quickstart/final_model.*alignpipe run "
                                                          r"quickstart"):
                    load_recipe(path)
            teacher = [{"source": "teacher", "k": 2, "model": str(tiny_model_path)}, {"source": "policy", "k": 2}]
            assert load_recipe(path, {"synthesis.mixture": teacher}).name == "distill"
            continue
        if "build" in yaml.safe_load(path.read_text()):  # a dataset build (Self-Instruct, Evol-Instruct)
            from alignpipe.synthesis.instruction_build.config import load_build_recipe

            assert load_build_recipe(path).name == path.stem
            continue
        assert load_recipe(path).name == path.stem


def test_provider_option_errors_name_the_provider():
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.score_dims\.margins: Extra inputs are not permitted"):
        load_recipe(None, {"optimization.inputs": {"score_dims": {"margins": ["a"]}}})
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.value_head\.learning_rate: Input should be greater"):
        load_recipe(None, {"optimization.inputs": {"value_head": {"learning_rate": 0}}})
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.tisdpo_weights: low \(2\.0\) must be below"):
        load_recipe(None, {"optimization.inputs": {"tisdpo_weights": {"low": 2}}})
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs: unknown input provider 'nope'"):
        load_recipe(None, {"optimization.inputs": {"nope": {}}})


def test_options_an_objective_needs_are_checked_at_load(tmp_path):
    """MODPO without its margin dimensions, Safe-RLHF without its cost dimension: fail at load, naming the key
    (not in `prepare`, after a round's sampling and judging)."""
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.score_dims\.margin: required for "
                                             r"chosen_margin_rewards"):
        load_recipe(_write(tmp_path, "optimization:\n  objectives: [{name: modpo}]\n"))
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.score_dims\.cost: required for costs"):
        load_recipe(None, {"instantiation.kind": "group", "optimization.objectives": [{"name": "safe_rlhf"}]})
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.score_dims\.cost: required for chosen_unsafe"):
        load_recipe(None, {"optimization.objectives": [{"name": "safe_rlhf_cost"}],
                           "optimization.inputs": {"score_dims": {"margin": ["rule:short"]}}})
    ok = load_recipe(None, {"optimization.objectives": [{"name": "modpo"}],
                            "optimization.inputs": {"score_dims": {"margin": ["rule:short"]}}})
    assert ok.optimization.inputs == {"score_dims": {"margin": ["rule:short"]}}
    # a provider's check sees only the names the recipe's objectives read: cost is not needed for MODPO
    assert load_recipe(None, {"optimization.objectives": [{"name": "dpo"}]}).optimization.inputs == {}


def test_provider_check_hook_is_called_with_the_names_read(monkeypatch):
    from alignpipe.optimization.providers import PROVIDERS

    seen = []

    def check(cls, options, names):
        seen.append((cls.name, options.init_std, set(names)))
        raise ValueError("init_std: too small for this test")

    monkeypatch.setattr(PROVIDERS["value_head"], "check", classmethod(check))
    with pytest.raises(AlignpipeError, match=r"optimization\.inputs\.value_head\.init_std: too small"):
        load_recipe(None, {"instantiation.kind": "group", "optimization.objectives": [{"name": "ppo"}],
                           "optimization.inputs": {"value_head": {"init_std": 0.5}}})
    assert seen == [("value_head", 0.5, {"values", "old_values"})]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task.digits": [5, 2]}, "task.arithmetic.digits: a range is [low, high]"),
    ({"task.ops": []}, "task.arithmetic.ops: at least one operator is needed"),
    ({"optimization.objectives": [{"name": "dpo", "beta": "high"}]}, "objective 'dpo': beta must be a number"),
    ({"name": "../escape"}, "name: '../escape' is a path; a run name is one folder name under output_dir"),
    ({"name": "/abs/path"}, "name: '/abs/path' is a path; a run name is one folder name under output_dir"),
    ({"name": "-x"}, "name: String should match pattern"),
    ({"rounds.deeper": 1}, "--set rounds.deeper: rounds is a value, not a section"),
])
def test_more_bad_values_fail_at_load_time(overrides, message):
    from alignpipe import AlignpipeError
    from alignpipe.config import load_recipe

    with pytest.raises(AlignpipeError) as err:
        load_recipe("quickstart", overrides)
    assert message in str(err.value)
