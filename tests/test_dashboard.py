"""The dashboard (``nsr report``): a self-contained static page per run and per sweep, built from the run's files.

Fast tests parse the HTML with the standard library. The browser tests (marked slow) open the pages in a real headless
Chromium through selenium and the system chromedriver: no console error, no network request, every panel present and
non-empty, the highlighted tokens carry the neuron's values, a screenshot that is not blank. Without a browser they fail
with how to install one (Debian: ``apt-get install chromium chromium-driver``; ``pip install selenium``), unless
``NSR_NO_BROWSER=1`` skips them.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import open_page

from nsr_hf.dashboard import DASHBOARD_DIR, build_dashboard, build_dashboard_after
from nsr_hf.dashboard.neuron_page import markdown_html

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

NEURON_PANELS = ["verdicts", "identity", "scan", "histogram", "examples", "accuracy", "methods", "layers", "faithfulness", "drift",
                 "training", "recipe", "cards"]
SWEEP_PANELS = ["verdicts", "summary", "runs"]


class Page(HTMLParser):
    """What a test reads from a page: the panels (their text and whether they hold a figure, a table, examples or a
    'missing' note), the token spans, the links and every attribute that could load something."""

    def __init__(self, text: str):
        super().__init__()
        self.panels: dict[str, dict] = {}
        self.tokens: list[dict] = []
        self.scan_tokens: list[dict] = []  # the tokens of the scan's top examples
        self.links: list[str] = []
        self.sources: list[str] = []
        self.scripts_with_src = 0
        self._open: list[str | None] = []
        self._token: dict | None = None
        self.feed(text)

    def _panel(self) -> dict | None:
        name = next((n for n in reversed(self._open) if n), None)
        return self.panels.get(name) if name else None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._open.append(a.get("data-panel"))
            if a.get("data-panel"):
                self.panels[a["data-panel"]] = {"text": "", "svg": 0, "table": 0, "examples": 0, "links": 0, "missing": False}
        panel = self._panel()
        if panel is not None:
            panel["svg"] += tag == "svg"
            panel["table"] += tag == "table"
            panel["examples"] += "data-group" in a
            panel["links"] += tag == "a"
            panel["missing"] |= tag == "p" and a.get("class") == "missing"
        if tag == "span" and "tok" in (a.get("class") or "").split() and "data-value" in a:
            self._token = {"value": a["data-value"], "title": a.get("title"), "labelled": "labelled" in a["class"].split(), "text": ""}
            if "data-position" in a:  # a token of a per-token example of the evaluation's rows
                self.tokens.append(self._token)
        if tag == "span" and "tok" in (a.get("class") or "").split() and "data-scan-value" in a:
            self._token = {"value": a["data-scan-value"], "title": a.get("title"), "labelled": "labelled" in a["class"].split(),
                           "text": ""}
            self.scan_tokens.append(self._token)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        for key in ("src", "srcset"):
            if a.get(key):
                self.sources.append(a[key])
        if tag == "link" and a.get("href"):
            self.sources.append(a["href"])
        if tag == "script" and a.get("src"):
            self.scripts_with_src += 1

    def handle_endtag(self, tag):
        if tag == "section" and self._open:
            self._open.pop()
        if tag == "span":
            self._token = None

    def handle_data(self, data):
        panel = self._panel()
        if panel is not None:
            panel["text"] += data
        if self._token is not None:
            self._token["text"] += data


def read_page(path: Path) -> Page:
    return Page(Path(path).read_text())


# ----------------------------------------------------------------------------------------------------------
# Runs to look at: a tiny real train run and a tiny real sweep (the pipeline builds their dashboards)

TINY_RECIPE = ("corpus: synthetic\nscan_documents: 8\ndataset_documents: 16\nmax_length: 24\nmax_steps: 2\n"
               "per_device_train_batch_size: 4\neval_strategy: 'no'\nlogging_steps: 1\nneuron: auto\nlayers: [0, 1]\n"
               "eval_methods: [mean, ridge_probe, shuffled_labels]\nn_bootstrap: 50\nlearning_rate: 1e-2\n")


def run_tiny(tiny_model_dirs, tmp_path_factory, name: str, *argv) -> tuple[Path, str]:
    """``nsr <argv> tiny.yaml --output_dir <tmp>/<out>`` on a tiny Llama: (the folder, what the command printed)."""
    from contextlib import redirect_stdout

    from nsr_hf.cli import main

    command, out, *flags = argv
    tmp = tmp_path_factory.mktemp(name)
    recipe = tmp / "tiny.yaml"
    recipe.write_text(f"model: {tiny_model_dirs['llama']}\n" + TINY_RECIPE)
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main([command, str(recipe), *flags, "--output_dir", str(tmp / out)])
    assert code == 0, printed.getvalue()[-2000:]
    return tmp / out, printed.getvalue()


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
    """``nsr train`` on a tiny Llama (synthetic corpus, two steps): the run folder and what the command printed."""
    return run_tiny(tiny_model_dirs, tmp_path_factory, "dashboard_run", "train", "run")


@pytest.fixture(scope="module")
def swept(tiny_model_dirs, tmp_path_factory):
    """``nsr sweep`` of the same recipe: 2 neurons x 1 seed."""
    return run_tiny(tiny_model_dirs, tmp_path_factory, "dashboard_sweep", "sweep", "sweep", "--top_n", "2", "--seeds", "0")


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run that a test may change (its predictor weights left out: the dashboard never reads them)."""
    folder, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    return copy


def write_known_examples(run: Path) -> list[dict]:
    """Replace the run's per-token examples with tokens whose values are known; returns them."""
    examples = [{"group": "top", "row": 0, "doc_id": "doc:0", "label_position": 2, "label_value": 3.0,
                 "tokens": ["The", " <cat>", " & sat", "\n"], "values": [0.5, -1.25, 3.0, 0.0]},
                {"group": "q50", "row": 7, "doc_id": "doc:7", "label_position": 0, "label_value": -0.75,
                 "tokens": ["x"], "values": [-0.75]}]
    neuron = json.loads((run / "metrics.json").read_text())["neurons"][0]
    (run / "evaluation" / "examples.json").write_text(json.dumps({"split": "test", "source": "a test", "neurons": [neuron],
                                                                  "by_neuron": {neuron: {"neuron": neuron, "examples": examples}}}))
    return examples


# ----------------------------------------------------------------------------------------------------------
# The builder, without a browser


def test_train_builds_the_dashboard_and_names_it_in_its_last_lines(trained):
    folder, printed = trained
    index = folder / DASHBOARD_DIR / "index.html"
    assert index.is_file()
    assert f"dashboard: {index}" in printed.strip().splitlines()[-1]


def test_the_neuron_page_has_every_panel_and_none_is_empty(trained):
    folder, _ = trained
    page = read_page(folder / DASHBOARD_DIR / "index.html")
    assert list(page.panels) == NEURON_PANELS
    for name, panel in page.panels.items():
        assert len(panel["text"].strip()) > 20, name
        assert panel["svg"] or panel["table"] or panel["examples"] or panel["links"] or panel["missing"] or name == "verdicts", name
    for name in ("histogram", "accuracy", "methods", "faithfulness", "training"):
        assert page.panels[name]["svg"] and not page.panels[name]["missing"], name
    assert page.panels["examples"]["examples"] > 0


def test_the_recipe_panel_shows_the_exact_command_that_produced_the_run(trained, swept):
    folder, _ = trained
    command = json.loads((folder / "metrics.json").read_text())["command"]
    assert command.startswith("nsr train ") and command.endswith(f"--output_dir {folder}")
    assert command in read_page(folder / DASHBOARD_DIR / "index.html").panels["recipe"]["text"]
    sweep, _ = swept  # a sweep's run was produced by the sweep's command
    run = next(sweep.glob("*/seed-0"))
    assert json.loads((run / "metrics.json").read_text())["command"].startswith("nsr sweep ")


def test_the_verdicts_at_the_top_are_those_nsr_train_prints(trained):
    from nsr_hf.methods import verdicts

    folder, _ = trained
    evaluation = json.loads((folder / "evaluation" / "metrics.json").read_text())
    text = " ".join(read_page(folder / DASHBOARD_DIR / "index.html").panels["verdicts"]["text"].split())
    for verdict in verdicts(evaluation, "test"):
        assert " ".join(verdict.split()) in text


def test_the_page_loads_nothing_from_elsewhere(trained):
    folder, _ = trained
    page = read_page(folder / DASHBOARD_DIR / "index.html")
    assert page.scripts_with_src == 0 and all(s.startswith("data:") for s in page.sources)
    assert not [link for link in page.links if "://" in link]
    for link in page.links:  # every link is a file of the run, relative to the page
        assert (folder / DASHBOARD_DIR / link).resolve().is_file(), link


def assert_examples_are_the_neurons_values(examples_file: Path, dataset: Path, page_path: Path, neuron: str, column: int, model) -> int:
    """Each highlighted token of ``neuron``'s page is the neuron at that token, read again here from ``model``; the boxed token
    is the labelled one and carries the dataset's value (column ``column``). Returns how many examples were checked."""
    import torch
    from datasets import load_from_disk

    from nsr_hf.capture import Neuron, capture_activations

    examples = json.loads(examples_file.read_text())
    rows = load_from_disk(str(dataset))[examples["split"]]
    shown = iter(read_page(page_path).tokens)
    mine = examples["by_neuron"][neuron]["examples"]
    for example in mine:
        ids = rows[example["row"]]["input_ids"]
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        expected = capture_activations(model, batch, [neuron], position="all")[Neuron.parse(neuron).layer][0, :, 0].numpy()
        spans = [next(shown) for _ in ids]
        np.testing.assert_allclose([float(s["value"]) for s in spans], expected, rtol=1e-4, atol=1e-5)
        labelled = [i for i, s in enumerate(spans) if s["labelled"]]
        assert labelled == [example["label_position"]]
        label = rows[example["row"]]["activations"][column]
        assert float(spans[labelled[0]]["value"]) == pytest.approx(label, rel=1e-4, abs=1e-5)
    assert next(shown, None) is None  # the page shows this neuron's examples and no others
    return len(mine)


def test_the_examples_carry_the_neurons_value_at_every_token(trained, tiny_model_dirs):
    """Each highlighted token's value is the neuron at that token, read again here from the original model."""
    from nsr_hf.models import load_model_and_tokenizer

    folder, _ = trained
    neuron = json.loads((folder / "metrics.json").read_text())["neurons"][0]
    model, _ = load_model_and_tokenizer(tiny_model_dirs["llama"])
    assert assert_examples_are_the_neurons_values(folder / "evaluation" / "examples.json", folder / "dataset",
                                                  folder / DASHBOARD_DIR / "index.html", neuron, 0, model) > 0


@pytest.fixture(scope="module")
def two_neurons(tiny_model_dirs, tmp_path_factory):
    """``nsr evaluate`` of a predictor of two neurons (1.3, 0.5) on a real dataset of the tiny Llama whose columns are in the
    other order (0.5, 1.3): the evaluation folder (its dashboard built by the command) and the model."""
    from contextlib import redirect_stdout

    from conftest import write_word_corpus

    from nsr_hf.cli import main
    from nsr_hf.data.generator import ActivationDatasetGenerator, DatasetConfig
    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.models import load_model_and_tokenizer

    tmp = tmp_path_factory.mktemp("two_neurons")
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs["llama"])
    corpus = write_word_corpus(tmp / "docs.jsonl", n=40)
    ActivationDatasetGenerator(DatasetConfig(neurons=["0.5", "1.3"], corpus=str(corpus), id_field="id", max_length=24,
                                             output_dir=str(tmp / "dataset")), model=model, tokenizer=tokenizer).generate()
    predictor = ActivationPredictor.from_base(model, tokenizer, neurons=["1.3", "0.5"],
                                              label_transform={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    predictor.save_pretrained(str(tmp / "predictor"))
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["evaluate", "--predictor", str(tmp / "predictor"), "--dataset", str(tmp / "dataset"), "--methods", "mean",
                     "ridge_probe", "--n_bootstrap", "20", "--causal", "false", "--counterfactual_rows", "0",
                     "--output_dir", str(tmp / "evaluation")])
    assert code == 0, printed.getvalue()[-2000:]
    return tmp / "evaluation", model


def test_a_predictor_of_two_neurons_gets_a_page_each_with_that_neurons_token_values(two_neurons):
    folder, model = two_neurons
    pages = {"1.3": folder / DASHBOARD_DIR / "index.html", "0.5": folder / DASHBOARD_DIR / "neuron-0.5.html"}
    for neuron, column in (("1.3", 1), ("0.5", 0)):  # the dataset's columns are (0.5, 1.3)
        page = read_page(pages[neuron])
        assert list(page.panels) == NEURON_PANELS and f"Neuron {neuron}" in page.panels["identity"]["text"]
        assert page.panels["examples"]["examples"] > 0 and not page.panels["examples"]["missing"]
        assert assert_examples_are_the_neurons_values(folder / "examples.json", folder.parent / "dataset", pages[neuron], neuron,
                                                      column, model) > 0
        for name in ("histogram", "accuracy", "methods"):
            assert page.panels[name]["svg"] and not page.panels[name]["missing"], (neuron, name)
        assert "neuron-0.5.html" in page.links and "index.html" in page.links  # each page links to the other
    from nsr_hf.dashboard.neuron_page import neuron_column
    from nsr_hf.dashboard.run_files import read_run

    run = read_run(folder)  # the histogram of each page is its neuron's column of the dataset the evaluation read
    assert run.dataset_dir == folder.parent / "dataset" and [neuron_column(run, n) for n in ("1.3", "0.5")] == [1, 0]


def test_examples_of_reads_this_format_and_the_single_neuron_one_before_it():
    from nsr_hf.evaluation.token_examples import examples_of

    new = {"split": "test", "source": "s", "neurons": ["1.3"], "not_shown": ["0.5"],
           "by_neuron": {"1.3": {"neuron": "1.3", "examples": [{"row": 1}]}}}
    assert examples_of(new, "1.3") == {"split": "test", "source": "s", "neuron": "1.3", "examples": [{"row": 1}]}
    assert examples_of(new, "0.5") is None
    old = {"neuron": "1.3", "split": "test", "examples": [{"row": 2}]}
    assert examples_of(old, "1.3") == old and examples_of(old, "0.5") is None
    failed = {"split": "test", "neurons": ["1.3"], "by_neuron": {}, "skipped": "reading them failed: X"}
    assert examples_of(failed, "1.3")["skipped"] == "reading them failed: X"


def test_the_scans_top_examples_are_coloured_token_by_token_with_the_scans_values(trained):
    folder, _ = trained
    neuron = json.loads((folder / "metrics.json").read_text())["neurons"][0]
    top = json.loads((folder / "scan" / "top_neurons.json").read_text())
    examples = next(e for e in top["top_neurons"] if e["neuron"] == neuron)["examples"][:10]
    spans = read_page(folder / DASHBOARD_DIR / "index.html").scan_tokens
    assert [float(s["value"]) for s in spans] == pytest.approx([v for e in examples for v in e["window_values"]], rel=1e-5, abs=1e-6)
    assert [s["text"] for s in spans] == [t.replace("\n", "↵") for e in examples for t in e["window_tokens"]]
    boxed = [i for i, s in enumerate(spans) if s["labelled"]]
    starts = np.cumsum([0] + [len(e["window_values"]) for e in examples])[:-1]
    assert boxed == [int(start) + e["window_label"] for start, e in zip(starts, examples)]


def test_known_token_values_are_on_the_spans_with_the_labelled_token_marked(run_copy):
    examples = write_known_examples(run_copy)
    page = read_page(build_dashboard(run_copy))
    spans = page.tokens
    assert [float(s["value"]) for s in spans] == [0.5, -1.25, 3.0, 0.0, -0.75]
    assert [s["title"] for s in spans] == ["0.5", "-1.25", "3", "0", "-0.75"]
    assert [s["labelled"] for s in spans] == [False, False, True, False, True]
    assert spans[1]["text"] == " <cat>" and spans[2]["text"] == " & sat"  # escaped in the HTML, the same text once parsed
    assert len(examples) == 2


def test_a_run_without_evaluation_says_so_in_words_in_every_panel_that_needs_it(run_copy):
    summary = json.loads((run_copy / "metrics.json").read_text())
    summary.pop("evaluation")
    summary["config"]["evaluate"] = False
    (run_copy / "metrics.json").write_text(json.dumps(summary))
    shutil.rmtree(run_copy / "evaluation")
    page = read_page(build_dashboard(run_copy))
    assert list(page.panels) == NEURON_PANELS
    for name in ("accuracy", "methods", "layers", "faithfulness"):
        assert page.panels[name]["missing"] and "evaluate: false" in page.panels[name]["text"], name
    assert "evaluation off" in page.panels["verdicts"]["text"]
    assert page.panels["histogram"]["svg"] and page.panels["training"]["svg"]  # what the run has is still shown


def test_the_sweep_page_has_a_row_per_run_linking_to_its_neuron_page(swept):
    folder, printed = swept
    index = folder / DASHBOARD_DIR / "index.html"
    assert f"sweep dashboard: {index}" in printed
    page = read_page(index)
    assert list(page.panels) == SWEEP_PANELS
    result = json.loads((folder / "sweep.json").read_text())
    assert len(page.links) == len(result["runs"]) == 2
    for link, run in zip(page.links, result["runs"]):
        target = (index.parent / link).resolve()
        assert target == (folder / run["neuron"] / "seed-0" / DASHBOARD_DIR / "index.html").resolve() and target.is_file()
        assert "data-sweep-link" in target.read_text()  # and each run's page links back to the sweep's
    median = result["summary"]["self"]["r2"]["median"]
    assert f"{median:.3f}" in page.panels["summary"]["text"]


def test_the_sweep_page_puts_the_honest_reader_next_to_the_report_and_counts_the_runs_that_beat_it(tmp_path):
    from nsr_hf.dashboard.sweep_page import sweep_page

    def run(neuron, seed, cf, honest, delta, beats):
        return {"neuron": neuron, "seed": seed, "status": "finished", "figures": {
            "self": {"r2": 0.9, "counterfactual_r2": cf, "slope_ratio": 0.95},
            "faithfulness:ridge_probe_intervened": {"counterfactual_r2": honest},
            "faithfulness:self_vs_ridge_probe_intervened": {"delta_counterfactual_r2": delta, "beats": beats}}}

    result = {"neurons": ["1.2", "3.4"], "seeds": [0], "runs": [run("1.2", 0, 0.8, 0.5, 0.3, 1.0), run("3.4", 0, 0.7, 0.69, 0.01, 0.0)]}
    context = sweep_page(tmp_path, result, lambda folder: None)
    labels = [label for _, label in context["columns"]]
    assert labels[:5] == ["natural R²", "counterfactual R²", "slope ratio", "honest reader's CF R²", "self − honest reader (CF R²)"]
    assert [r["values"]["self_minus_honest_reader"] for r in context["rows"]] == [0.3, 0.01]
    assert [r["values"]["honest_reader_cf_r2"] for r in context["rows"]] == [0.5, 0.69]
    assert any("beats the honest outside reader" in v and "in 1 of 2 runs" in v for v in context["verdicts"])


def test_nsr_evaluate_rebuilds_the_dashboard_of_the_run_that_holds_it(trained, tmp_path, capsys):
    from nsr_hf.cli import main

    folder, _ = trained
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    shutil.rmtree(run / DASHBOARD_DIR)
    argv = ["evaluate", "--predictor", str(run / "predictor"), "--output_dir", str(run / "evaluation"), "--overwrite",
            "--methods", "mean", "--n_bootstrap", "50", "--no_causal"]
    assert main(argv) == 0
    index = run / DASHBOARD_DIR / "index.html"
    assert f"dashboard: {index}" in capsys.readouterr().out
    methods = read_page(index).panels["methods"]["text"]
    assert "mean" in methods and "ridge_probe" not in methods  # the new evaluation's, not the copy in the run's metrics.json


def test_an_evaluation_folder_alone_gets_a_page_that_says_what_it_lacks(trained, tmp_path):
    from nsr_hf.cli import main

    folder, _ = trained
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--predictor", str(folder / "predictor"), "--output_dir", str(out), "--methods", "mean",
                 "--n_bootstrap", "50", "--no_causal"]) == 0
    page = read_page(out / DASHBOARD_DIR / "index.html")
    assert list(page.panels) == NEURON_PANELS
    assert page.panels["accuracy"]["svg"] and page.panels["examples"]["examples"]
    assert page.panels["training"]["missing"] and "evaluation only" in page.panels["training"]["text"]


def test_a_folder_that_is_neither_a_run_nor_a_sweep_is_one_clear_line(tmp_path, capsys):
    from nsr_hf.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a run nor a sweep" in err[0] and err[0].startswith("nsr report: error:")


def test_nsr_report_rebuilds_a_runs_dashboard(run_copy, capsys):
    from nsr_hf.cli import main

    shutil.rmtree(run_copy / DASHBOARD_DIR)
    assert main(["report", str(run_copy)]) == 0
    assert (run_copy / DASHBOARD_DIR / "index.html").is_file()
    assert f"dashboard: {run_copy / DASHBOARD_DIR / 'index.html'}" in capsys.readouterr().out


def test_a_dashboard_that_fails_costs_only_itself_and_says_how_to_rebuild_it(run_copy, capsys, monkeypatch):
    import nsr_hf.dashboard.build as build

    def broken(folder, rebuild_runs=False):
        raise RuntimeError("a broken template")

    monkeypatch.setattr(build, "build_dashboard", broken)
    assert build_dashboard_after(run_copy) is None
    err = capsys.readouterr().err
    assert "a broken template" in err and f"nsr report {run_copy}" in err and "saved" in err


def test_the_report_tables_become_html_with_their_text_escaped():
    html = markdown_html("Heading <b>\n\n| method | R² |\n| --- | --- |\n| **self** | 0.9 [0.8, 1.0] |\n")
    assert "<p>Heading &lt;b&gt;</p>" in html
    assert "<th>method</th><th>R²</th>" in html and "<td><strong>self</strong></td><td>0.9 [0.8, 1.0]</td>" in html


# ----------------------------------------------------------------------------------------------------------
# In a real browser

def panels_in_browser(browser) -> dict[str, dict]:
    """Each panel in page order: the length of its visible text, its height and how many figures, tables, examples, 'missing'
    notes and list items it shows."""
    found = browser.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('[data-panel]'), function (p) {"
        " return [p.dataset.panel, p.innerText.trim().length, p.getBoundingClientRect().height,"
        " p.querySelectorAll('svg, table, .example, p.missing, li').length]; });")
    return {name: {"text": text, "height": height, "content": content} for name, text, height, content in found}


def assert_not_blank(browser, path: Path) -> None:
    from PIL import Image

    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1400, min(int(height) + 120, 12000))
    browser.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"the screenshot {path} is blank (pixel std {pixels.std():.1f})"


@pytest.mark.slow
def test_the_neuron_page_in_a_browser(trained, browser, tmp_path):
    folder, _ = trained
    seen = open_page(browser, folder / DASHBOARD_DIR / "index.html")
    assert not [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")], seen["console"]
    page_url = (folder / DASHBOARD_DIR / "index.html").resolve().as_uri()
    assert [url for url in seen["requests"] if url != page_url] == []
    panels = panels_in_browser(browser)
    assert list(panels) == NEURON_PANELS
    for name, panel in panels.items():
        assert panel["text"] > 20 and panel["height"] > 40 and panel["content"] > 0, (name, panel)
    assert_not_blank(browser, tmp_path / "neuron_page.png")


@pytest.mark.slow
def test_the_tokens_carry_their_values_in_a_browser(run_copy, browser):
    write_known_examples(run_copy)
    index = build_dashboard(run_copy)
    open_page(browser, index)
    spans = browser.execute_script(
        "return Array.prototype.slice.call(document.querySelectorAll('.example .tok')).map(function (s) {"
        " return [s.dataset.value, s.title, s.classList.contains('labelled'), s.textContent, getComputedStyle(s).backgroundColor]; });")
    assert [float(s[0]) for s in spans] == [0.5, -1.25, 3.0, 0.0, -0.75]
    assert [s[2] for s in spans] == [False, False, True, False, True]
    assert spans[1][3] == " <cat>"
    assert spans[2][4] != spans[3][4] and spans[3][4].endswith(", 0)")  # the largest value is coloured, zero is not


@pytest.mark.slow
def test_the_sweep_page_in_a_browser_sorts_and_links(swept, browser, tmp_path):
    folder, _ = swept
    index = folder / DASHBOARD_DIR / "index.html"
    seen = open_page(browser, index)
    assert not [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")], seen["console"]
    assert [url for url in seen["requests"] if url != index.resolve().as_uri()] == []
    assert all(p["text"] > 20 and p["content"] > 0 for p in panels_in_browser(browser).values())
    headers = browser.find_elements("css selector", "table.sortable th")
    column = [h.text for h in headers].index("natural R²")

    def column_values():
        return browser.execute_script(
            "return Array.prototype.map.call(document.querySelector('table.sortable').tBodies[0].rows,"
            " function (r) { return parseFloat(r.cells[arguments[0]].dataset.sort); });".replace("arguments[0]", str(column)))

    headers[column].click()
    assert column_values() == sorted(column_values())
    headers[column].click()
    assert column_values() == sorted(column_values(), reverse=True)
    href = browser.execute_script("return document.querySelector('table.sortable a').href")
    browser.get(href)
    assert browser.execute_script("return document.querySelectorAll('[data-panel]').length") == len(NEURON_PANELS)
    open_page(browser, index)
    assert_not_blank(browser, tmp_path / "sweep_page.png")


def test_nsr_report_loads_no_torch_transformers_or_datasets(run_copy):
    """``nsr report`` reads files only: it starts in a fraction of a second instead of the seconds torch takes."""
    script = ("import sys; from nsr_hf.cli import main; code = main(['report', sys.argv[1]]); "
              "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, str(run_copy)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (run_copy / DASHBOARD_DIR / "index.html").is_file()
