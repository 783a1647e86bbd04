"""Any-neuron self-report: the split by neuron, the conditioned head, and one reporter scored on neurons it never saw.

The constructed model: a tiny Llama in which every neuron of layer 1 writes along its own output direction (orthonormal,
apart from the directions the tokens vary in), no attention output and no other MLP, so the residual stream two blocks on
holds each neuron's value along its output direction. A reporter conditioned on the neuron's weights can read a neuron it
never trained on; one told only the neuron's name cannot.
"""
import json

import numpy as np
import pytest
import torch
from conftest import build_model, open_page, write_word_corpus
from torch import nn

from nsr_hf.data.neuron_split import NeuronSplit, neuron_columns, varying_neurons
from nsr_hf.modeling.neuron_queries import name_query, neuron_queries
from nsr_hf.modeling.predictor import ActivationPredictor, load_predictor

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, NEURONS, VARYING = 64, 40, 12  # token directions: dims 1..VARYING; output directions: the dims above them


def constructed_llama(vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=NEURONS, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = torch.zeros(vocab_size, HIDDEN)
        emb[:, 0] = 12.0  # a large constant direction: the norms divide every row by about the same
        emb[:, 1:VARYING + 1] = torch.randn(vocab_size, VARYING, generator=g)
        model.model.embed_tokens.weight.copy_(emb)
        out_dirs = torch.linalg.qr(torch.randn(HIDDEN - VARYING - 1, NEURONS, generator=g))[0]  # orthonormal columns
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            if i == 1:
                layer.mlp.down_proj.weight[VARYING + 1:, :] = out_dirs
                for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    proj.weight.zero_()
                    proj.weight[:, 1:VARYING + 1] = torch.randn(NEURONS, VARYING, generator=g) * 0.5
    return model


@pytest.fixture(scope="module")
def constructed_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("constructed")
    constructed_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


# -- the split by neuron


def test_a_split_by_neuron_is_disjoint_seeded_and_refuses_to_hold_out_everything():
    neurons = [f"3.{i}" for i in range(20)]
    split = NeuronSplit.draw(neurons, validation=4, held_out=6, seed=0)
    assert (len(split.train), len(split.validation), len(split.held_out)) == (10, 4, 6)
    assert sorted(split.train + split.validation + split.held_out, key=lambda n: int(n.split(".")[1])) == neurons
    assert split == NeuronSplit.draw(neurons, validation=4, held_out=6, seed=0)
    assert split != NeuronSplit.draw(neurons, validation=4, held_out=6, seed=1)
    assert split.group_of("3.%s" % split.held_out[0].split(".")[1]) == "held_out"
    with pytest.raises(ValueError, match="at least one must be left to train on"):
        NeuronSplit.draw(neurons, validation=10, held_out=10)
    with pytest.raises(ValueError, match="in both train and held_out"):
        NeuronSplit(train=["1.1", "1.2"], validation=[], held_out=["1.2"])


def test_the_train_columns_hold_no_held_out_neurons_value(tmp_path, tiny_model_dirs):
    from nsr_hf.data.generator import DatasetConfig, run_dataset
    from nsr_hf.data.storage import load_activation_dataset

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=40)
    neurons = [f"1.{i}" for i in range(0, 24, 2)]
    run_dataset(DatasetConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), id_field="id", neurons=neurons, max_length=16,
                              output_dir=str(tmp_path / "ds")))
    dd, metadata = load_activation_dataset(tmp_path / "ds")
    split = NeuronSplit.draw(varying_neurons(metadata), validation=2, held_out=4, seed=0)
    train, train_meta = neuron_columns(dd, metadata, split.train)
    full = np.asarray(dd["train"]["activations"])
    kept = np.asarray(train["train"]["activations"])
    assert kept.shape == (len(dd["train"]), len(split.train)) and train_meta["neurons"] == split.train
    columns = [metadata["neurons"].index(n) for n in split.train]
    np.testing.assert_array_equal(kept, full[:, columns])
    np.testing.assert_array_equal(np.asarray(train["train"]["activations_z"]), np.asarray(dd["train"]["activations_z"])[:, columns])
    assert train_meta["transform"]["mean"] == [metadata["transform"]["mean"][j] for j in columns]
    held = [metadata["neurons"].index(n) for n in split.held_out]
    for j in held:  # no held-out neuron's column survives, in any split
        for s in train:
            values = np.asarray(train[s]["activations"])
            assert not any(np.array_equal(values[:, i], np.asarray(dd[s]["activations"])[:, j]) for i in range(values.shape[1]))
    assert set(train_meta["statistics"]["train"]) == set(split.train)
    with pytest.raises(ValueError, match="no column for neuron"):
        neuron_columns(dd, metadata, ["1.1"])


# -- the conditioned head


def test_the_weight_query_reads_back_a_value_written_along_the_output_direction(tiny_tokenizer):
    model = constructed_llama(len(tiny_tokenizer))
    queries = neuron_queries(model, ["1.3", "1.7"], "weights")
    w_out = model.model.layers[1].mlp.down_proj.weight[:, [3, 7]].T
    assert queries.shape == (2, 3 * HIDDEN)
    torch.testing.assert_close((2.5 * w_out * queries[:, :HIDDEN]).sum(-1), torch.full((2,), 2.5))
    torch.testing.assert_close(queries[:, HIDDEN:2 * HIDDEN].norm(dim=-1), torch.ones(2))
    names = neuron_queries(model, ["1.3", "1.7"], "name")
    torch.testing.assert_close(names[0], name_query("1.3", 3 * HIDDEN, HIDDEN))
    assert not torch.allclose(names[0], names[1])


def test_retarget_shares_the_parameters_and_only_the_conditioned_head_can(tiny_tokenizer, tmp_path):
    model = build_model("llama", len(tiny_tokenizer))
    predictor = ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3", "1.5"], head_type="conditioned", read_layer=2)
    view = predictor.retarget(["1.9", "0.2", "2.30"])
    x = torch.randint(0, 300, (3, 6))
    assert view(x).predictions.shape == (3, 3) and predictor(x).predictions.shape == (3, 2)
    assert predictor.config.neurons == ["1.3", "1.5"] and view.neuron_head is predictor.neuron_head
    with torch.no_grad():
        predictor.neuron_head.gains.fill_(3.0)
    assert float(view.neuron_head.gains.detach()[0, 0]) == 3.0
    torch.testing.assert_close(view.retarget(["1.3", "1.5"])(x).predictions, predictor(x).predictions)
    predictor.save_pretrained(tmp_path / "p")
    loaded = load_predictor(tmp_path / "p")
    assert loaded.config.conditioning == "weights"
    torch.testing.assert_close(loaded(x).predictions, predictor(x).predictions)
    regression = ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3"], head_type="regression", read_layer=2)
    with pytest.raises(ValueError, match="only the conditioned head"):
        regression.retarget(["1.4"])
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3"], head_type="conditioned", conditioning="neuron id")


# -- one reporter, scored on neurons it never saw


@pytest.fixture(scope="module")
def any_neuron_run(constructed_dir, tmp_path_factory):
    from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron

    root = tmp_path_factory.mktemp("any")
    corpus = write_word_corpus(root / "corpus.jsonl", n=120)
    config = AnyNeuronConfig(model=constructed_dir, corpus=str(corpus), neuron_layer=1, neuron_count=NEURONS,
                             validation_neurons=6, held_out_neurons=12, read_layer="target+1", unfreeze="head_only", head_init="probe",
                             dataset_documents=120, max_length=16, num_train_epochs=8, learning_rate=1e-2, per_device_train_batch_size=16,
                             eval_strategy="no", save_strategy="no", causal_rows=16, causal_values=3, output_dir=str(root / "run"),
                             report_to="none")
    return run_any_neuron(config), root / "run", config


def test_a_weight_conditioned_reporter_reads_neurons_it_never_trained_on_and_the_name_only_control_cannot(any_neuron_run):
    result, out, _ = any_neuron_run
    held = result["summary"]["held_out"]
    assert held["neurons"] == 12
    assert held["weights"]["natural_r2"] > 0.9, held
    assert held["weights"]["slope_ratio"] > 0.8, held
    assert held["name"]["natural_r2"] < 0.3, held
    assert held["ridge_probe_r2"] > 0.9, held  # the reference: this model's neurons are linearly readable
    assert result["summary"]["train"]["weights"]["natural_r2"] > 0.9
    for n, scores in result["per_neuron"].items():
        assert scores["group"] == NeuronSplit(**result["split"]).group_of(n)


def test_an_any_neuron_run_writes_its_split_table_figure_and_reporters_and_refuses_to_run_again(any_neuron_run):
    from nsr_hf.any_neuron import refuse_finished
    from nsr_hf.errors import UserError

    result, out, config = any_neuron_run
    split = json.loads((out / "neuron_split.json").read_text())
    assert split["held_out"] == result["split"]["held_out"] and not set(split["held_out"]) & set(split["train"])
    assert json.loads((out / "any_neuron.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert (out / "any_neuron.png").stat().st_size > 10_000
    assert "| held-out | 12 |" in (out / "any_neuron.md").read_text()
    for conditioning in ("weights", "name"):
        loaded = load_predictor(out / conditioning / "predictor")
        assert loaded.config.neurons == split["train"] and loaded.config.conditioning == conditioning
        assert not (out / conditioning / "checkpoints").exists()
    with pytest.raises(UserError, match="already holds a finished any-neuron run"):
        refuse_finished(config)


def test_the_dashboard_of_an_any_neuron_run_shows_every_group_and_every_neuron(any_neuron_run):
    from nsr_hf.dashboard import build_dashboard

    result, out, _ = any_neuron_run
    page = (out / "dashboard" / "index.html").read_text()  # built at the end of the run
    assert page == build_dashboard(out).read_text()
    for group in ("train neurons", "validation neurons", "held-out neurons (never trained on)"):
        assert f'<tr data-group="{group}">' in page
    for neuron, scores in result["per_neuron"].items():
        assert f'<tr data-neuron="{neuron}" data-group="{scores["group"].replace("_", "-")}">' in page
    assert page.count("<tr data-neuron=") == len(result["per_neuron"]) == 40
    assert '<svg class="figure"' in page and "weights: slope ratio" in page and "name: R²" in page


@pytest.mark.slow
def test_the_any_neuron_page_in_a_browser_sorts_by_group_and_figure(any_neuron_run, browser):
    _, out, _ = any_neuron_run
    index = out / "dashboard" / "index.html"
    seen = open_page(browser, index)
    assert not [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")], seen["console"]
    assert [url for url in seen["requests"] if url != index.resolve().as_uri()] == []
    headers = browser.find_elements("css selector", "table.sortable th")
    names = [h.text for h in headers]

    def column(name, number=True):
        values = browser.execute_script("return Array.prototype.map.call(document.querySelector('table.sortable').tBodies[0].rows,"
                                        f" function (r) {{ return r.cells[{names.index(name)}].dataset.sort; }});")
        return [float(v) for v in values] if number else values

    headers[names.index("weights: R²")].click()
    assert column("weights: R²") == sorted(column("weights: R²"))
    headers[names.index("group")].click()
    assert column("group", number=False) == sorted(column("group", number=False))
    assert browser.execute_script("return document.querySelectorAll('svg.figure').length") == 1


@pytest.mark.slow  # a whole nsr train run (scan-free: a named neuron) with its evaluation
def test_nsr_train_runs_a_conditioned_reporter_with_interventions_and_its_predictor_reports_other_neurons(tiny_model_dirs, tmp_path):
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=80)
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron="1.3", head_type="conditioned", head_init="probe",
                         unfreeze="after_target", read_layer="target+1", dataset_documents=80, max_length=16, num_train_epochs=1,
                         intervention_rate=0.5, output_dir=str(tmp_path / "run"), report_to="none")
    summary = run_train(config)
    assert summary["evaluation"]["faithfulness"] and summary["evaluation"]["causal"]
    predictor = load_predictor(tmp_path / "run" / "predictor")
    assert predictor.config.head_type == "conditioned" and predictor.config.intervention["rate"] == 0.5
    x = torch.randint(0, 300, (2, 6))
    assert predictor.retarget(["1.5", "2.7"])(x).predictions.shape == (2, 2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_inputs_readout_computes_the_neurons_as_the_model_does(arch, tiny_tokenizer):
    from nsr_hf.architectures import compute_neurons
    from nsr_hf.modeling.neuron_queries import NeuronInputs

    model = build_model(arch, len(tiny_tokenizer))
    x = torch.randn(5, model.config.hidden_size)
    inputs = NeuronInputs(model, ["1.3", "1.5", "1.17"])
    with torch.no_grad():
        torch.testing.assert_close(inputs.values(x), compute_neurons(model, 1, x, torch.tensor([3, 5, 17])))
    predictor = ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3"], head_type="conditioned", read_layer=2,
                                              conditioning="weights+inputs")
    assert {"neuron_head.input_gains", "neuron_head.recompute_weight"} <= set(predictor.state_dict())
    plain = ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3"], head_type="conditioned", read_layer=2)
    assert "neuron_head.recompute_weight" not in plain.state_dict()  # no parameter that the loss never reaches (DDP)


def test_nsr_evaluate_points_a_conditioned_reporter_at_held_out_neurons_and_gives_each_groups_medians(any_neuron_run, tmp_path):
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.metrics import finite_median

    result, out, _ = any_neuron_run
    split = NeuronSplit.read(out / "neuron_split.json")
    picked = split.held_out[:3] + split.validation[:2]
    config = EvaluateConfig(predictor=str(out / "weights" / "predictor"), dataset=str(out / "dataset"), neurons=picked,
                            neuron_split=str(out / "neuron_split.json"), methods=["ridge_probe"], causal_max_rows=12,
                            counterfactual_rows=12, n_bootstrap=20, output_dir=str(tmp_path / "evaluation"))
    evaluation = run_evaluate(config)
    assert evaluation["neurons"] == picked and set(evaluation["by_neuron"]) == set(picked)
    groups = evaluation["groups"]
    assert set(groups) == {"held_out", "validation"} and groups["held_out"]["neurons"] == 3 and groups["validation"]["neurons"] == 2
    r2 = [evaluation["by_neuron"][n]["metrics"]["test"]["self"]["r2"] for n in split.held_out[:3]]
    assert groups["held_out"]["natural_r2"] == pytest.approx(finite_median(r2))
    assert groups["held_out"]["natural_r2"] > 0.5  # the weight-conditioned reporter reads neurons it never trained on
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["groups"] == json.loads(json.dumps(groups))
    with pytest.raises(ValueError, match="not a split by neuron"):
        NeuronSplit.read(out / "any_neuron.json")


def test_nsr_evaluate_refuses_to_point_a_single_neuron_head_at_other_neurons(any_neuron_run, tmp_path, tiny_tokenizer):
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate

    _, out, _ = any_neuron_run
    regression = ActivationPredictor.from_base(build_model("llama", len(tiny_tokenizer)), tiny_tokenizer, neurons=["1.3"], read_layer=2)
    config = EvaluateConfig(dataset=str(out / "dataset"), neurons=["1.4"], methods=["none"], output_dir=str(tmp_path / "e"))
    with pytest.raises(ValueError, match="only the conditioned head"):
        run_evaluate(config, predictor=regression)


@pytest.mark.parametrize(("flags", "message"), [
    (["--neuron_count", "40", "--held_out_neurons", "32", "--validation_neurons", "8"], "must leave at least one of the 40 neurons"),
    (["--neuron_count", "40", "--held_out_neurons", "10", "--validation_neurons", "5", "--train_neurons", "30"],
     "more than the 25 neurons"),
    (["--conditionings", "neuron id"], "conditioning must be one of"),
    (["--head_type", "regression"], "needs a head that reports any neuron"),
    (["--causal_values", "1"], "at least 2"),
    (["--head_init", "random"], "use head_init 'probe'"),
])
def test_nsr_any_neuron_refuses_a_bad_recipe_before_loading_anything(flags, message, tmp_path, capsys):
    from nsr_hf.cli import main

    out = tmp_path / "out"
    assert main(["any-neuron", "--neuron_layer", "1", "--output_dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_rerun_after_an_interruption_keeps_the_reporters_it_finished_and_trains_the_rest(any_neuron_run, tmp_path, monkeypatch):
    import shutil

    import nsr_hf.any_neuron as any_neuron

    _, out, config = any_neuron_run
    rerun = tmp_path / "rerun"
    shutil.copytree(out, rerun)
    for name in ("any_neuron.json", "any_neuron.md", "any_neuron.png"):
        (rerun / name).unlink()
    shutil.rmtree(rerun / "name")  # interrupted while the name reporter trained: its folder is gone
    (rerun / "weights+inputs" / "training.json").unlink()  # ... or it was saved without its training.json: trained again
    trained = []
    real = any_neuron.train_reporter
    monkeypatch.setattr(any_neuron, "train_reporter", lambda *a, **k: trained.append(a[5]) or real(*a, **k))
    from dataclasses import replace

    result = any_neuron.run_any_neuron(replace(config, output_dir=str(rerun)))
    assert trained == ["weights+inputs", "name"]
    kept = load_predictor(rerun / "weights" / "predictor")
    original = load_predictor(out / "weights" / "predictor")
    assert all(torch.equal(a, b) for a, b in zip(kept.neuron_head.state_dict().values(), original.neuron_head.state_dict().values()))
    assert result["summary"]["held_out"]["weights"]["natural_r2"] > 0.9


def test_only_the_read_direction_of_a_conditioned_head_trains_and_its_closed_form_mean_stays(tiny_tokenizer):
    from nsr_hf.training.unfreezing import head_prefixes, set_trainable

    model = build_model("llama", len(tiny_tokenizer))
    predictor = ActivationPredictor.from_base(model, tiny_tokenizer, neurons=["1.3"], head_type="conditioned", read_layer=2,
                                              conditioning="weights+inputs")
    assert set(set_trainable(predictor, head_prefixes(predictor))) == {"neuron_head.gains", "neuron_head.mix"}


def test_closed_form_only_keeps_each_reporter_at_its_fitted_start_and_runs_no_trainer(constructed_dir, tmp_path):
    from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=120)
    config = AnyNeuronConfig(model=constructed_dir, corpus=str(corpus), neuron_layer=1, neuron_count=NEURONS, validation_neurons=6,
                             held_out_neurons=12, read_layer="target+1", unfreeze="head_only", dataset_documents=120, max_length=16,
                             causal_rows=16, causal_values=3, closed_form_only=True, conditionings=["weights", "name"],
                             scored_groups=["held_out"], output_dir=str(tmp_path / "run"), report_to="none")
    result = run_any_neuron(config)
    assert all(t["global_step"] == 0 and t["closed_form_only"] for t in result["training"].values())
    assert list(result["summary"]) == ["held_out"]
    assert result["summary"]["held_out"]["weights"]["natural_r2"] > 0.9 > 0.3 > result["summary"]["held_out"]["name"]["natural_r2"]


# -- nsr sweep of an any-neuron recipe


@pytest.fixture(scope="module")
def any_neuron_sweep(constructed_dir, tmp_path_factory):
    import yaml

    from nsr_hf.sweep import SweepConfig, run_sweep

    root = tmp_path_factory.mktemp("any_sweep")
    recipe = root / "any.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": constructed_dir, "corpus": str(write_word_corpus(root / "corpus.jsonl", n=120)), "neuron_layer": 1,
        "neuron_count": NEURONS, "validation_neurons": 6, "held_out_neurons": 12, "read_layer": "target+1", "unfreeze": "head_only",
        "dataset_documents": 120, "max_length": 16, "causal_rows": 16, "causal_values": 3, "closed_form_only": True,
        "conditionings": ["weights", "name"], "seed": 7, "report_to": "none"}))
    config = SweepConfig(recipe=str(recipe), seeds=[0, 1], output_dir=str(root / "sweep"))
    return run_sweep(config), root / "sweep", config


def test_nsr_sweep_of_an_any_neuron_recipe_splits_the_same_neurons_anew_per_seed_on_one_dataset(any_neuron_sweep):
    result, out, _ = any_neuron_sweep
    assert result["kind"] == "any_neuron" and result["failed"] == 0 and [r["seed"] for r in result["runs"]] == [0, 1]
    runs = [json.loads((out / f"seed-{s}" / "any_neuron.json").read_text()) for s in (0, 1)]
    splits = [NeuronSplit(**r["split"]) for r in runs]
    members = [set(s.train + s.validation + s.held_out) for s in splits]
    assert members[0] == members[1]
    assert splits[0].held_out != splits[1].held_out  # the seed splits the neurons anew
    assert (out / "seed-0" / "dataset" / "dataset_dict.json").is_file() and not (out / "seed-1" / "dataset").exists()
    assert json.loads((out / "seed-1" / "weights" / "predictor" / "config.json").read_text())["neurons"] == splits[1].train
    assert sorted(result["neurons"], key=lambda n: int(n.split(".")[1])) == result["neurons"] and len(result["neurons"]) == NEURONS


def test_the_any_neuron_sweep_summary_is_the_spread_of_each_groups_medians_and_each_neurons_medians(any_neuron_sweep):
    from nsr_hf.sweep import spread

    result, out, _ = any_neuron_sweep
    runs = [json.loads((out / f"seed-{s}" / "any_neuron.json").read_text()) for s in (0, 1)]
    for group in ("train", "validation", "held_out"):
        for reporter in ("weights", "name"):
            for figure in ("natural_r2", "slope_ratio"):
                assert result["summary"][group][reporter][figure] == spread([r["summary"][group][reporter][figure] for r in runs])
        assert result["summary"][group]["ridge_probe"]["natural_r2"] == spread([r["summary"][group]["ridge_probe_r2"] for r in runs])
    held = result["summary"]["held_out"]
    assert held["weights"]["natural_r2"]["min"] > 0.9 > 0.3 > held["name"]["natural_r2"]["max"]
    held_once = next(n for n in runs[0]["split"]["held_out"] if n not in runs[1]["split"]["held_out"])
    entry = result["per_neuron"][held_once]
    assert [(r["seed"], r["group"]) for r in entry["runs"]][0] == (0, "held_out") and entry["medians"]["held_out"]["runs"] == 1
    assert entry["medians"]["held_out"]["weights"]["natural_r2"] == runs[0]["per_neuron"][held_once]["weights"]["natural_r2"]
    text = (out / "sweep.md").read_text()
    assert "| held-out | weights | 2 |" in text and "| held-out | ridge probe | 2 |" in text and "| 1 | trained | 12 |" in text


def test_the_any_neuron_sweep_page_links_every_run_and_each_run_links_back(any_neuron_sweep, browser):
    result, out, _ = any_neuron_sweep
    index = out / "dashboard" / "index.html"
    page = index.read_text()
    for group in ("train neurons", "validation neurons", "held-out neurons (never trained on)"):
        for reporter in ("weights", "name", "ridge probe (own labels)"):
            assert f'<tr data-group="{group}" data-reporter="{reporter}">' in page
    assert '<a href="../seed-0/dashboard/index.html">seed 0</a>' in page and '<a href="../seed-1/dashboard/index.html">seed 1</a>' in page
    assert page.count("<tr data-neuron=") == NEURONS
    for seed in (0, 1):
        run_page = (out / f"seed-{seed}" / "dashboard" / "index.html").read_text()
        assert '<a href="../../dashboard/index.html" data-sweep-link>' in run_page
    seen = open_page(browser, index)
    assert not [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")], seen["console"]
    assert [url for url in seen["requests"] if url != index.resolve().as_uri()] == []
    table = "document.querySelectorAll('table.sortable')[1]"
    names = browser.execute_script(f"return Array.prototype.map.call({table}.tHead.rows[0].cells, "
                                   "function (c) { return c.textContent; });")
    column = names.index("held out: weights: R²")
    browser.execute_script(f"{table}.tHead.rows[0].cells[{column}].click();")
    values = browser.execute_script(f"return Array.prototype.map.call({table}.tBodies[0].rows, "
                                    f"function (r) {{ return r.cells[{column}].dataset.sort; }});")
    numbers = [float(v) for v in values if v != "n/a"]
    assert numbers == sorted(numbers) and values[len(numbers):] == ["n/a"] * (len(values) - len(numbers))  # never held out: last


def test_a_second_any_neuron_sweep_skips_finished_runs_and_the_sweep_refuses_its_own_keys(any_neuron_sweep, tmp_path):
    from nsr_hf.sweep import SweepConfig, run_sweep

    result, out, config = any_neuron_sweep
    again = run_sweep(config)
    assert [r["status"] for r in again["runs"]] == ["skipped (finished before)"] * 2 and again["summary"] == result["summary"]
    with pytest.raises(ValueError, match="neuron_split_seed is set by the sweep itself"):
        run_sweep(config, {"neuron_split_seed": 3})
    with pytest.raises(ValueError, match="an any-neuron sweep builds one dataset"):
        run_sweep(SweepConfig(recipe=config.recipe, datasets_from=str(out), output_dir=str(tmp_path / "s")))


# -- the conditioned token head: the token head for any neuron


def test_asking_repeats_each_row_with_distinct_neurons_balanced_over_all_pairs():
    from datasets import Dataset

    from nsr_hf.data.neuron_split import asking

    rows = Dataset.from_dict({"row": list(range(25))})
    asked = asking(rows, neurons_count=7, per_row=3, seed=0)
    assert len(asked) == 75 and asked["asked"] == asking(rows, 7, 3, seed=0)["asked"] != asking(rows, 7, 3, seed=1)["asked"]
    by_row: dict = {}
    for r, a in zip(asked["row"], asked["asked"]):
        by_row.setdefault(r, []).append(a)
    assert all(len(set(v)) == 3 and all(0 <= a < 7 for a in v) for v in by_row.values())  # never the same neuron twice
    counts = np.bincount(asked["asked"], minlength=7)
    assert counts.sum() == 75 and counts.max() - counts.min() <= 3
    assert len(asking(rows, neurons_count=2, per_row=5)) == 50  # at most one question per neuron
    with pytest.raises(ValueError, match="already have an 'asked' column"):
        asking(asked, 7, 2)


def _token_reporter(tiny, neurons, conditioning="weights", **kw):
    from nsr_hf.data.labels import shared_bins, with_shared_bins

    model, tok = tiny
    shared = shared_bins(np.random.default_rng(0).normal(size=(40, len(neurons))), 10)
    transform = with_shared_bins({"mean": [0.0] * len(neurons), "std": [1.0] * len(neurons)}, len(neurons), shared)
    return ActivationPredictor.from_base(model, tok, neurons=neurons, head_type="conditioned_token", label_transform=transform,
                                         read_layer=2, conditioning=conditioning, **kw)


@pytest.mark.parametrize("tiny", ["llama", "gpt2"], indirect=True)
def test_the_conditioned_token_head_asks_one_prompt_per_neuron_on_shared_bins(tiny, tmp_path):
    from nsr_hf.capture import encode_texts
    from nsr_hf.data.labels import bins_of
    from nsr_hf.modeling.predictor import save_predictor

    predictor = _token_reporter(tiny, ["1.3", "1.5", "2.7"])
    torch.manual_seed(0)
    with torch.no_grad():  # query embeddings that differ by neuron (they start at 0: every neuron would read the same)
        predictor.neuron_head.weight.normal_(std=0.5)
    batch = encode_texts(tiny[1], ["Hello world", "A much longer text about neurons", "def f(x)"], max_length=16)
    full = predictor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert full.logits.shape == (3, 3, 10) and full.predictions.shape == (3, 3)
    assert not torch.allclose(full.logits[:, 0], full.logits[:, 1])  # the prompt names the neuron
    labels = torch.tensor([[0.1, 0.5, -1.0], [2.0, 0.0, 0.3], [-0.2, 0.9, 0.0]])
    asked = torch.tensor([2, 0, 1])
    one = predictor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, asked=asked)
    assert one.logits.shape == (3, 1, 10)
    torch.testing.assert_close(one.logits[:, 0], full.logits[torch.arange(3), asked], atol=1e-5, rtol=1e-5)
    shared = predictor.config.label_transform
    target = bins_of(labels[torch.arange(3), asked], shared["shared_bin_edges"])
    torch.testing.assert_close(one.loss, nn.functional.cross_entropy(one.logits[:, 0].float(), target))
    centers = torch.tensor(shared["shared_bin_centers"], dtype=torch.float32)
    torch.testing.assert_close(full.predictions, full.logits.float().softmax(-1) @ centers)
    one.loss.backward()
    assert predictor.neuron_head.weight.grad.abs().sum() > 0  # the query embeddings learn
    view = predictor.retarget(["0.1", "2.7"])  # a neuron it never saw, on the same scale
    assert view.config.label_transform["shared_bin_edges"] == shared["shared_bin_edges"]
    with torch.no_grad():
        seen = view(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(seen[:, 1], full.logits[:, 2].detach(), atol=1e-5, rtol=1e-5)
    save_predictor(predictor, tmp_path / "p")
    loaded = load_predictor(tmp_path / "p")
    with torch.no_grad():
        again = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, full.logits.detach())
    assert "conditioned_token (any neuron; weights query as 2 prompt embeddings" in predictor.head.card_words(predictor)


def test_the_conditioned_token_head_refuses_what_it_cannot_do(tiny_model_dirs):
    from nsr_hf.models import load_model_and_tokenizer

    tiny = load_model_and_tokenizer(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="'weights' or 'name'"):
        _token_reporter(tiny, ["1.3"], conditioning="weights+inputs")
    with pytest.raises(ValueError, match=r"must hold \{neuron\}"):
        _token_reporter(tiny, ["1.3"], prompt_suffix="\nLevel:")
    with pytest.raises(ValueError, match="one scale: pass a label_transform with shared bins"):
        ActivationPredictor.from_base(tiny[0], tiny[1], neurons=["1.3"], head_type="conditioned_token",
                                      label_transform={"mean": [0.0], "std": [1.0], "bin_edges": [[0, 1, 2]]})
    regression = ActivationPredictor.from_base(tiny[0], tiny[1], neurons=["1.3"])
    with pytest.raises(ValueError, match="only the conditioned token head asks one per prompt"):
        regression(input_ids=torch.tensor([[5, 6, 7]]), asked=torch.tensor([0]))


@pytest.mark.slow  # two reporters trained by the Trainer on asked rows, with interventions, and scored
def test_nsr_any_neuron_trains_conditioned_token_reporters_on_rows_that_each_ask_about_one_neuron(tiny_model_dirs, tmp_path):
    from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=80)
    config = AnyNeuronConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron_layer=1, neuron_count=10, validation_neurons=2,
                             held_out_neurons=3, read_layer="target+1", head_type="conditioned_token", head_init="random",
                             conditionings=["weights", "name"], questions_per_row=2, num_bins=4, unfreeze="head_only",
                             intervention_rate=0.5, dataset_documents=80, max_length=16, num_train_epochs=2, learning_rate=1e-2,
                             per_device_train_batch_size=8, eval_strategy="no", save_strategy="no", logging_steps=2, causal_rows=8,
                             causal_values=3, scored_groups=["held_out", "validation"], output_dir=str(tmp_path / "run"), report_to="none")
    result = run_any_neuron(config)
    train_rows = result["rows"]["train"]
    for conditioning in ("weights", "name"):
        training = json.loads((tmp_path / "run" / conditioning / "training.json").read_text())
        assert training["head_type"] == "conditioned_token" and training["train_prompts"] == 2 * train_rows
        assert training["global_step"] == 2 * -(-2 * train_rows // 8)  # two epochs of the asked rows
        loaded = load_predictor(tmp_path / "run" / conditioning / "predictor")
        assert loaded.config.head_type == "conditioned_token" and loaded.config.intervention["rate"] == 0.5
        assert loaded.config.neurons == result["split"]["train"]
        assert loaded.neuron_head.weight.abs().sum() > 0  # it trained from its zero start
    assert set(result["summary"]) == {"validation", "held_out"} and result["head_type"] == "conditioned_token"
    for neuron in result["split"]["held_out"]:
        scores = result["per_neuron"][neuron]
        assert np.isfinite(scores["weights"]["natural_r2"]) and scores["weights"]["meaningful"]
    assert "Head: conditioned_token" in (tmp_path / "run" / "any_neuron.md").read_text()
    assert "head conditioned_token" in (tmp_path / "run" / "dashboard" / "index.html").read_text()
    # the full evaluation protocol of the token reporter, pointed at held-out neurons, with each group's medians
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate

    picked = result["split"]["held_out"][:2]
    run = tmp_path / "run"
    evaluation = run_evaluate(EvaluateConfig(predictor=str(run / "weights" / "predictor"), dataset=str(run / "dataset"), neurons=picked,
                                             neuron_split=str(run / "neuron_split.json"), methods=["ridge_probe"], causal_max_rows=8,
                                             counterfactual_rows=8, n_bootstrap=20, output_dir=str(tmp_path / "evaluation")))
    assert set(evaluation["by_neuron"]) == set(picked) and evaluation["groups"]["held_out"]["neurons"] == 2
    for neuron in picked:
        assert np.isfinite(evaluation["by_neuron"][neuron]["metrics"]["test"]["self"]["r2"])


def test_reporters_on_one_frozen_base_share_their_causal_tests_and_get_the_same_results(any_neuron_run):
    from nsr_hf.any_neuron import share_frozen_base, slope_ratios
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.evaluation.causal import causal_tests

    result, out, config = any_neuron_run
    reporters = {c: load_predictor(out / c / "predictor") for c in ("weights", "weights+inputs", "name")}
    members = result["split"]["held_out"][:3]
    rows = neuron_columns(*load_activation_dataset(out / "dataset"), members)[0]["test"].to_list()
    views = [r.retarget(members) for r in reporters.values()]
    alone = [slope_ratios([v], rows, members[1], config)[0] for v in views]
    assert share_frozen_base(reporters) and all(r.base is reporters["weights"].base for r in reporters.values())
    views = [r.retarget(members) for r in reporters.values()]
    together = slope_ratios(views, rows, members[1], config, shared=True)
    for a, b in zip(alone, together):
        assert a["slope"] == pytest.approx(b["slope"], rel=1e-5, abs=1e-7) and a["slope_ratio"] == pytest.approx(b["slope_ratio"], rel=1e-5)
    with torch.no_grad():  # a base that differs is not shared
        other = load_predictor(out / "name" / "predictor")
        other.base.get_input_embeddings().weight[0, 0] += 1.0
    assert not share_frozen_base({"weights": load_predictor(out / "weights" / "predictor"), "name": other})
    with pytest.raises(ValueError, match="same base model object"):
        causal_tests([load_predictor(out / "weights" / "predictor").retarget(members), other.retarget(members)], rows, neuron=members[0])


@pytest.mark.slow  # a scan, a dataset of neurons of two layers and two closed-form reporters
def test_nsr_any_neuron_takes_the_scans_top_neurons_across_layers(tiny_model_dirs, tmp_path):
    from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron
    from nsr_hf.errors import UserError
    from nsr_hf.scanner import load_scan

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=80)
    options = dict(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_top_n=10, layers=[0, 1], validation_neurons=2,
                   held_out_neurons=3, read_layer="target+1", unfreeze="head_only", closed_form_only=True, dataset_documents=80,
                   max_length=16, causal_rows=8, causal_values=3, scored_groups=["held_out"], report_to="none")
    result = run_any_neuron(AnyNeuronConfig(**options, conditionings=["weights", "name"], output_dir=str(tmp_path / "run")))
    scan = load_scan(tmp_path / "run" / "scan")
    top = [str(scan.neuron_at_rank(r)) for r in range(1, 11)]
    split = result["split"]
    assert sorted(split["train"] + split["validation"] + split["held_out"] + result["dropped_constant"]) == sorted(top)
    assert set(result["layers"]) <= {0, 1} and result["read_layer"] == max(result["layers"]) + 1
    assert all(np.isfinite(result["per_neuron"][n]["weights"]["natural_r2"]) for n in split["held_out"])
    assert result["layers"] == [0, 1]  # the top 10 of the tiny model span both layers
    with pytest.raises(UserError, match="recomputes neurons of one layer"):  # which the recompute term cannot: one MLP norm
        run_any_neuron(AnyNeuronConfig(**options, conditionings=["weights+inputs"], output_dir=str(tmp_path / "run2")))
    with pytest.raises(ValueError, match="one source of neurons"):
        AnyNeuronConfig(**{**options, "neuron_layer": 1})
