"""Shared fixtures: tiny random GPT-2, Llama and GPT-NeoX models with a tiny byte-level BPE tokenizer,
saved as local folders so that tests go through the same loading code as users. Offline by construction."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Neurons in the MLP layer respond to particular tokens and contexts.",
    "Python is a programming language; its documentation explains modules, classes and functions.",
    "0 1 2 3 4 5 6 7 8 9 on off yes no level Neuron",
    "def function(argument): return argument + 1",
    "A language model predicts the next token from the previous tokens.",
] * 20


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_word_corpus(path, n: int = 60, seed: int = 0):
    """A jsonl corpus of ``n`` short documents of random words (ids d0..), for pipeline tests; returns ``path``."""
    import json
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog neurons in MLP layer respond to particular tokens Python 0 1 2 3".split()
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))}) + "\n"
                            for i in range(n)))
    return path


def build_tokenizer():
    """A GPT-2-like byte-level BPE tokenizer (no pad token, like GPT-2) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_model(arch: str, vocab_size: int, n_layers: int = 3, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=n_layers, n_head=4,
            activation_function="gelu_new", initializer_range=0.1,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        )
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=0, eos_token_id=0,
        )
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """``{arch: folder}`` of saved tiny models (each folder holds the model and the tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for arch in ("gpt2", "llama", "gpt_neox"):
        model = build_model(arch, len(tiny_tokenizer))
        path = root / arch
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tiny_model_dirs):
    """A tiny random model and its tokenizer, loaded through nsr_hf (GPT-2 and Llama)."""
    from nsr_hf.models import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dirs[request.param])


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 (converted once per cache dir); slow tests only."""
    from nsr_hf.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the embedded SmolLM2 or runs long; `make test` runs them, plain `pytest` skips them")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models run
    faster on one thread, and on a shared machine thread contention costs them up to 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same(x, y, where: str) -> None:
    if isinstance(x, float) and isinstance(y, float):
        assert abs(x - y) <= 1e-6 + 1e-5 * abs(y), f"{where}: {x!r} != {y!r}"
    elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        assert len(x) == len(y), f"{where}: {len(x)} != {len(y)} items"
        for i, (a, b) in enumerate(zip(x, y)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(x, dict) and isinstance(y, dict):
        assert sorted(x) == sorted(y), f"{where}: keys {sorted(x)} != {sorted(y)}"
        for key in x:
            _same(x[key], y[key], f"{where}[{key!r}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


@pytest.fixture
def same_rows():
    """``same_rows(a, b)``: two datasets' rows (``{split: Dataset.to_dict()}`` or one ``to_dict()``) are equal, every text,
    id and bin exactly and every float to float32 round-off. Two runs of the same forward pass may differ in the last bit
    (CI caught 1 ulp between a resumed dataset and an uninterrupted one: BLAS kernels may depend on memory alignment)."""
    return lambda a, b: _same(a, b, "rows")


# -- the dashboard's pages in a real browser (tests/test_dashboard.py, tests/test_any_neuron.py)


BROWSER_HELP = ("No headless browser for the dashboard tests. Install Chromium and its driver (Debian/Ubuntu: "
                "`apt-get install chromium chromium-driver`; macOS: `brew install --cask chromium chromedriver`) and selenium "
                "(`pip install selenium`), or skip these tests with NSR_NO_BROWSER=1.")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium through the system chromedriver, with its console and network logs."""
    if os.environ.get("NSR_NO_BROWSER"):
        pytest.skip("NSR_NO_BROWSER is set: the browser tests are skipped")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(BROWSER_HELP + " (selenium is not installed)")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail(BROWSER_HELP + f" (found browser: {binary}, chromedriver: {driver_path})")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> dict:
    """Open ``path`` from disk; the console messages and the URLs of every request the page made."""
    browser.get_log("browser"), browser.get_log("performance")  # start from empty logs
    browser.get(path.resolve().as_uri())
    browser.execute_script("return document.readyState")
    console = browser.get_log("browser")
    requests = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    return {"console": console, "requests": requests}
