"""Recipes: every recipe in recipes/ parses into a TrainConfig (a transformers.TrainingArguments); defaults < YAML <
--key value; values are read by the field types (PyYAML reads 2e-5 as a string) or rejected naming the field; unknown
keys list the valid ones; every Trainer option is a recipe key that reaches the Trainer; the quickstart runs the shipped
recipe; nsr_hf/train.py runs as a script (nsr_hf/ first on sys.path, PITFALLS HF-1)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nsr_hf.parsing import RecipeParser, shipped_recipe
from nsr_hf.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PARSER = RecipeParser(TrainConfig)


def parse_config(argv: list[str]) -> TrainConfig:
    """``[recipe.yaml] [--key value ...]`` as ``nsr train`` reads it."""
    (config,) = PARSER.parse(argv)
    return config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "regression.yaml", "classification.yaml", "token_digits.yaml", "lora.yaml"}
    assert {p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")} >= {"cpu_2proc.yaml", "multi_gpu.yaml", "fsdp.yaml"}


def test_the_quickstart_runs_the_shipped_recipe_file():
    from nsr_hf.quickstart import RECIPE, quickstart_config

    assert shipped_recipe(RECIPE) == ROOT / "recipes" / "quickstart.yaml"  # a checkout reads the file itself, not a copy
    assert quickstart_config() == parse_config([str(ROOT / "recipes" / "quickstart.yaml")])
    assert quickstart_config(["--seed", "4"]).seed == 4 and quickstart_config(seed=5).seed == 5


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 2 and loaded.distributed_type.value in ("MULTI_GPU", "FSDP")


def command_config(recipe: Path):
    """The config dataclass of the command a shipped recipe is for: ``nsr any-neuron``'s, or ``nsr train``'s (the rule
    ``nsr sweep`` uses to tell them apart)."""
    from nsr_hf.any_neuron import AnyNeuronConfig
    from nsr_hf.sweep import is_any_neuron_recipe

    return AnyNeuronConfig if is_any_neuron_recipe(yaml.safe_load(recipe.read_text())) else TrainConfig


def test_the_any_neuron_recipes_are_told_apart_from_train_recipes():
    assert [r.name for r in RECIPES if command_config(r) is not TrainConfig] == ["any_neuron.yaml", "any_neuron_token.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_every_key_is_a_config_field(recipe):
    raw = yaml.safe_load(recipe.read_text())
    parser = RecipeParser(command_config(recipe))
    assert set(raw) <= set(parser.keys())
    (config,) = parser.parse([str(recipe)])
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert getattr(config, key) == pytest.approx(value), key
    assert isinstance(config.learning_rate, float)


def test_the_command_line_overrides_the_recipe_which_overrides_the_defaults(tmp_path):
    path = write(tmp_path, "learning_rate: 0.01\nseed: 3\nunfreeze: head_only\n")
    config = parse_config([path, "--seed", "7", "--unfreeze=last_k", "--unfreeze_k", "2"])
    assert config.learning_rate == 0.01  # recipe over default
    assert config.seed == 7 and config.unfreeze == "last_k" and config.unfreeze_k == 2  # command line over recipe
    assert config.max_length == TrainConfig().max_length  # default kept


def test_yaml_2e_minus_5_is_coerced_to_a_float(tmp_path):
    path = write(tmp_path, "learning_rate: 2e-5\nnum_train_epochs: 3\nbf16: 'false'\nlayers: [1, 2]\n")
    assert isinstance(yaml.safe_load(Path(path).read_text())["learning_rate"], str)  # why coercion is needed
    config = parse_config([path])
    assert config.learning_rate == 2e-5 and isinstance(config.learning_rate, float)
    assert config.num_train_epochs == 3.0 and config.bf16 is False and config.layers == [1, 2]
    assert parse_config(["--learning_rate", "3e-4", "--bf16", "--read_layer", "none"]).bf16 is True


@pytest.mark.parametrize("key,value", [("learning_rate", "fast"), ("seed", "1.5"), ("bf16", "maybe"), ("max_length", "many")])
def test_an_uncoercible_value_is_rejected_naming_the_field(key, value):
    with pytest.raises(ValueError, match=key):
        parse_config([f"--{key}", value])


def test_an_unknown_key_is_rejected_listing_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown key.*lerning_rate.*Valid keys:.*learning_rate"):
        parse_config([write(tmp_path, "lerning_rate: 0.1\n")])
    with pytest.raises(ValueError, match="Valid keys"):
        parse_config(["--epochs", "3"])


def test_a_neuron_yaml_read_as_a_number_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quoted"):
        parse_config([write(tmp_path, "neuron: 12.340\n")])
    assert parse_config([write(tmp_path, "neuron: '12.340'\n")]).neuron_choice() == "12.340"
    assert parse_config([write(tmp_path, "neuron: 3\n")]).neuron_choice() == 3


def test_invalid_choices_are_rejected():
    with pytest.raises(ValueError, match="unfreeze"):
        TrainConfig(unfreeze="everything")
    with pytest.raises(ValueError, match="unfreeze_k"):
        TrainConfig(unfreeze="last_k")
    with pytest.raises(ValueError, match="head_type"):
        TrainConfig(head_type="ranking")


def test_a_bad_faithfulness_setting_fails_before_training_not_in_the_evaluation_after_it():
    with pytest.raises(ValueError, match="Unknown counterfactual source 'bogus': use one of interchange, uniform, shift"):
        TrainConfig(output_dir="out", counterfactual_source="bogus")
    with pytest.raises(ValueError, match="counterfactual_rows must be 0 .no faithfulness section. or more, got -1"):
        TrainConfig(output_dir="out", counterfactual_rows=-1)


def test_train_py_runs_as_a_script_with_its_folder_first_on_sys_path():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "nsr_hf" / "train.py"), "--help"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--learning_rate" in result.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "nsr_hf" / "train.py"), "--lerning_rate", "1"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120, check=False)
    assert bad.returncode == 2 and "Valid keys" in bad.stderr


def test_read_layer_accepts_an_index_target_plus_k_or_none():
    assert parse_config(["--read_layer", "target+2"]).read_layer_for(7, 30) == 9
    assert parse_config(["--read_layer", "9"]).read_layer_for(7, 30) == 9
    assert parse_config(["--read_layer", "7"]).read_layer_for(7, 30) == 7  # the target's own block: allowed (the evaluation flags it)
    with pytest.raises(ValueError, match="read_layer 4 is before the layer of the target neuron"):
        parse_config(["--read_layer", "4"]).read_layer_for(7, 30)  # a block where the neuron is not yet computed
    assert parse_config(["--read_layer", "none"]).read_layer_for(7, 30) is None
    assert parse_config(["--read_layer", "target+5"]).read_layer_for(28, 30) == 29  # past the end: the last block, with a warning
    for bad in ("target-1", "after", "-3"):
        with pytest.raises(ValueError, match="read_layer"):
            parse_config(["--read_layer", bad])
    with pytest.raises(ValueError, match="out of range"):
        parse_config(["--read_layer", "40"]).read_layer_for(7, 30)


def test_new_choices_are_validated():
    for key, value, message in (("labels", "current", "labels must be"), ("select", "best", "select must be"),
                                ("probe_layers", "some", "probe_layers must be"), ("save_strategy", "often", "save_strategy must be"),
                                ("head_init", "zeros", "head_init must be")):
        with pytest.raises(ValueError, match=message):
            parse_config([f"--{key}", value])
    with pytest.raises(ValueError, match="gradual"):
        parse_config(["--unfreeze", "gradual", "--resume_from_checkpoint", "latest"])
    with pytest.raises(ValueError, match="head_init 'probe' initialises a regression head"):
        parse_config(["--head_type", "classification", "--head_init", "probe"])
    with pytest.raises(ValueError, match="expected_value_loss_weight must be >= 0"):
        parse_config(["--head_type", "token", "--expected_value_loss_weight", "-1"])
    with pytest.raises(ValueError, match="expected_value_loss_weight applies to the token head only"):
        parse_config(["--head_type", "regression", "--expected_value_loss_weight", "1"])
    assert parse_config(["--head_type", "token", "--expected_value_loss_weight", "0.5", "--unfreeze", "lora_after_target"]
                        ).expected_value_loss_weight == 0.5
    assert parse_config(["--head_type", "token", "--prompt_suffix", ""]).prompt_suffix == ""  # empty is a value, not "unset"
    with pytest.raises(ValueError, match="prompt_suffix applies to the token head only"):
        parse_config(["--prompt_suffix", " Level:"])
    with pytest.raises(ValueError, match="the only field is {neuron}"):
        parse_config(["--head_type", "token", "--prompt_suffix", "{layer}"])
    assert parse_config(["--split_fractions", "0.4,0.1,0.5"]).split_fractions == [0.4, 0.1, 0.5]
    assert parse_config(["--head_type", "token", "--bin_strategy", "kmeans"]).bin_strategy == "kmeans"
    with pytest.raises(ValueError, match="bin_strategy must be one of quantile, equal_width, kmeans, got 'lloyd'"):
        parse_config(["--head_type", "token", "--bin_strategy", "lloyd"])
    with pytest.raises(ValueError, match="the regression head has none"):
        parse_config(["--bin_strategy", "kmeans"])
    with pytest.raises(ValueError, match="num_bins must be at least 2"):
        parse_config(["--head_type", "classification", "--num_bins", "1"])
    with pytest.raises(ValueError, match="split_fractions must be 3 numbers"):
        parse_config(["--split_fractions", "0.5,0.6,0.1"])
    with pytest.raises(ValueError, match="gives test no documents"):
        parse_config(["--split_fractions", "0.9", "0.1", "0"])
    with pytest.raises(ValueError, match="lora_after_target' chooses its blocks"):  # refused before any scan or dataset is written
        parse_config(["--unfreeze", "lora_after_target", "--unfreeze_k", "3"])


def test_list_values_on_the_command_line():
    config = parse_config(["--layers", "0", "1", "2", "--cross_models", "minilm,gpt2", "--eval_methods", "mean", "--bf16"])
    assert (config.layers == [0, 1, 2] and config.cross_models == ["minilm", "gpt2"] and config.eval_methods == ["mean"]
            and config.bf16 is True)


def test_a_recipe_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="a recipe is a flat mapping"):
        parse_config([write(tmp_path, "- learning_rate\n- 0.1\n")])


def test_an_optional_key_is_unset_with_none_in_the_recipe_or_on_the_command_line(tmp_path):
    assert parse_config([write(tmp_path, "layers: null\nunfreeze_k: ~\n")]).layers is None
    assert parse_config(["--layers", "none", "--unfreeze_k", "none"]).unfreeze_k is None
    config = parse_config([write(tmp_path, "head_type: token\nbin_strategy: kmeans\n"), "--bin_strategy", "none"])
    assert config.bin_strategy is None  # the command line unsets what the recipe set


def test_every_trainer_option_is_a_recipe_key_checked_by_transformers(tmp_path):
    config = parse_config([write(tmp_path,
                                 "lr_scheduler_type: cosine\nmax_grad_norm: 0.5\ngradient_checkpointing: true\noptim: adafactor\n")])
    assert (config.lr_scheduler_type, config.max_grad_norm, config.gradient_checkpointing, config.optim) == (
        "cosine", 0.5, True, "adafactor")
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        parse_config(["--lr_scheduler_type", "sometimes"])  # the Trainer's own choices
    with pytest.raises(ValueError, match="fp16 and bf16"):
        parse_config(["--fp16", "--bf16"])  # the Trainer's own validation


def test_trainer_options_of_a_recipe_reach_the_trainers_arguments(tiny_model_dirs, tmp_path, monkeypatch):
    """The arguments the PredictorTrainer really gets in run_train carry the recipe's Trainer options."""
    from conftest import write_word_corpus

    from nsr_hf import pipeline

    seen = {}

    class RecordingTrainer(pipeline.PredictorTrainer):
        def __init__(self, *args, **kwargs):
            seen["args"] = kwargs["args"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline, "PredictorTrainer", RecordingTrainer)
    corpus = write_word_corpus(tmp_path / "docs.jsonl", n=30)
    recipe = write(tmp_path, f"model: {tiny_model_dirs['llama']}\ncorpus: {corpus}\nneuron: '1.3'\ndataset_documents: 30\nmax_length: 16\n"
                             "max_steps: 2\nevaluate: false\nlr_scheduler_type: cosine\nmax_grad_norm: 0.25\nwarmup_steps: 1\n"
                             f"weight_decay: 0.01\nrun_name: my-run\noutput_dir: {tmp_path / 'out'}\n")
    summary = pipeline.run_train(parse_config([recipe, "--adam_beta2", "0.99"]))
    args = seen["args"]
    assert (args.lr_scheduler_type, args.max_grad_norm, args.warmup_steps, args.weight_decay) == ("cosine", 0.25, 1, 0.01)
    assert args.adam_beta2 == 0.99 and args.run_name == "my-run" and args.max_steps == 2 == summary["global_step"]
    # what the run decides: checkpoints under output_dir/checkpoints, the self-reporter's defaults, no push of the Trainer's own
    assert args.output_dir == str(tmp_path / "out" / "checkpoints") and args.push_to_hub is False
    assert args.remove_unused_columns is False and args.label_names == ["labels"] and args.ddp_find_unused_parameters is False
    assert summary["config"]["lr_scheduler_type"] == "cosine"  # metrics.json records every key


def test_help_lists_every_key_with_its_help_the_trainers_too():
    text = PARSER.format_help()
    for key in ("--neuron", "--unfreeze", "--learning_rate", "--lr_scheduler_type", "--max_grad_norm", "--gradient_checkpointing",
                "--optim"):
        assert key in text, key
    assert "'auto' (the scan's best)" in text  # our help
    assert "(default: 0.001)" in text  # the self-reporter's default learning rate, not the Trainer's


def test_scan_recipe_values_are_read_by_their_field_types(tmp_path):
    from nsr_hf.scanner import ScanConfig

    (config,) = RecipeParser(ScanConfig).parse([write(tmp_path, "threshold: 2e-1\ntop_n: '5'\nlayers: [2, 0]\n")])
    assert config.threshold == 0.2 and config.top_n == 5 and config.layers == [0, 2]
    with pytest.raises(ValueError, match="top_n"):
        RecipeParser(ScanConfig).parse(["--top_n", "five"])


def test_a_recipe_writes_a_list_as_a_yaml_list_or_one_comma_separated_string(tmp_path):
    assert parse_config([write(tmp_path, "split_fractions: 0.6, 0.2, 0.2\n")]).split_fractions == [0.6, 0.2, 0.2]
    assert parse_config([write(tmp_path, "cross_models: [minilm, gpt2]\n")]).cross_models == ["minilm", "gpt2"]


def test_the_faithful_quickstart_is_the_quickstart_with_intervention_training():
    plain = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    faithful = yaml.safe_load((ROOT / "recipes" / "quickstart_faithful.yaml").read_text())
    added = {"intervention_rate": 0.5, "intervention_source": "interchange"}
    tuned = {"learning_rate": 1e-3, "num_train_epochs": 6}  # reading the set value is learnt: more steps, a higher rate
    assert {k: faithful[k] for k in tuned} == tuned
    assert {k: v for k, v in faithful.items() if k not in added and k not in tuned} == {
        **{k: v for k, v in plain.items() if k not in tuned}, "output_dir": "outputs/quickstart_faithful"}
    config = parse_config([str(ROOT / "recipes" / "quickstart_faithful.yaml")])
    assert (config.intervention_rate, config.intervention_source) == (0.5, "interchange")
    assert parse_config([str(ROOT / "recipes" / "quickstart.yaml")]).intervention_rate == 0  # the plain quickstart stays plain


def test_the_faithful_token_exit_recipe_is_the_token_exit_recipe_with_intervention_training():
    plain = yaml.safe_load((ROOT / "recipes" / "quickstart_token_exit.yaml").read_text())
    faithful = yaml.safe_load((ROOT / "recipes" / "quickstart_token_exit_faithful.yaml").read_text())
    changed = {"intervention_rate": 0.5, "intervention_source": "interchange", "num_train_epochs": 6,
               "output_dir": "outputs/quickstart_token_exit_faithful"}
    assert faithful == {**plain, **changed}
    config = parse_config([str(ROOT / "recipes" / "quickstart_token_exit_faithful.yaml")])
    assert (config.head_type, config.intervention_rate, config.num_train_epochs) == ("token", 0.5, 6)


def test_the_faithful_own_next_token_recipe_reads_at_the_labelled_token_with_intervention_training():
    plain = yaml.safe_load((ROOT / "recipes" / "quickstart_token.yaml").read_text())
    faithful = yaml.safe_load((ROOT / "recipes" / "quickstart_token_faithful.yaml").read_text())
    # the report moves to the labelled token, where the neuron is set (the prompt would leave it to attention), k-means bins
    head = {"prompt_suffix": "", "bin_strategy": "kmeans"}
    changed = {"intervention_rate": 0.5, "intervention_source": "interchange", "num_train_epochs": 6,
               "drift_every_n_steps": 120, "output_dir": "outputs/quickstart_token_faithful"}
    assert faithful == {**plain, **head, **changed}
    config = parse_config([str(ROOT / "recipes" / "quickstart_token_faithful.yaml")])
    assert (config.head_type, config.read_layer, config.unfreeze) == ("token", None, "lora_after_target")
    assert (config.prompt_suffix, config.intervention_rate) == ("", 0.5)


@pytest.mark.parametrize("name", ["regression.yaml", "classification.yaml", "token_digits.yaml", "lora.yaml"])
def test_the_gpu_recipes_offer_intervention_training_as_a_commented_line(name, tmp_path):
    text = (ROOT / "recipes" / name).read_text()
    assert "# intervention_rate: 0.5" in text and "intervention_rate" not in yaml.safe_load(text)
    # the offered block (the commented key lines from intervention_rate on), uncommented, is a valid faithful recipe; a
    # token head's block also moves the report to the labelled token, without which the set value did not reach it
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# intervention_rate:"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("# ") or ":" not in lines[i].split("#")[1])
    offered = [line[2:] for line in lines[start:end]]
    keys = {k for k in yaml.safe_load("\n".join(offered))}
    kept = [line for line in lines if not any(line.startswith(f"{k}:") for k in keys)]  # the block's keys replace the recipe's
    (tmp_path / name).write_text("\n".join(kept[:start] + offered + kept[start:]) + "\n")
    config = parse_config([str(tmp_path / name)])
    assert config.intervention_rate == 0.5
    if config.head_type == "token":
        assert config.prompt_suffix == "" and config.bin_strategy == "kmeans"
