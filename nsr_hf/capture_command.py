"""``nsr capture``: print (and optionally save) the values of named neurons for the documents of a corpus.

    nsr capture --neurons 12.345 12.7 --corpus embedded --max_documents 5 --output values.json
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nsr_hf.capture import capture_activations, encode_texts, parse_position, validate_neuron, validate_position
from nsr_hf.data.corpus import load_corpus
from nsr_hf.data.preflight import check_neurons
from nsr_hf.errors import UserError
from nsr_hf.models import load_model_and_tokenizer, load_model_config, process_device
from nsr_hf.shared_config import CorpusFields
from nsr_hf.utils import write_json


@dataclass
class CaptureConfig(CorpusFields):
    """Print (and optionally save) neuron values for the documents of a corpus."""

    neurons: list[str] = field(kw_only=True, metadata={"help": "Neurons as layer.index, e.g. 12.345 12.7"})
    max_documents: int = field(default=8, metadata={"help": "How many documents to read"})
    position: str = field(default="last", metadata={"help": "'last', 'max', or an integer token index (0 first, -1 last)"})
    max_length: int = field(default=256, metadata={"help": "Texts are cut to this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward pass"})
    output: str | None = field(default=None, metadata={"help": "Write the values here as JSON"})


def run_capture(config: CaptureConfig) -> list[dict]:
    from tqdm.auto import tqdm

    position = validate_position(parse_position(config.position))
    if position == "all":
        raise ValueError("nsr capture prints one value per document: use position 'last', 'max' or an integer.")
    if config.output and Path(config.output).is_dir():  # found now, not after the model ran
        raise UserError(f"--output {config.output!r} is a folder: give the path of a JSON file to write "
                        f"(e.g. {config.output}/values.json).")
    check_neurons(load_model_config(config.model), config.neurons, config.model)  # from the config: before the weights load
    model, tokenizer = load_model_and_tokenizer(config.model, device=process_device())
    neurons = [validate_neuron(model, n) for n in config.neurons]
    corpus = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer)
    docs = list(corpus.iter_documents(limit=config.max_documents))
    if not docs:
        raise ValueError(f"The corpus {config.corpus!r} yielded no documents.")
    rows = []
    for start in tqdm(range(0, len(docs), config.batch_size), desc="capture", unit="batch"):
        chunk = docs[start : start + config.batch_size]
        batch = encode_texts(tokenizer, [d.text for d in chunk], max_length=config.max_length)
        cap = capture_activations(model, batch, neurons, position=position)
        for i, doc in enumerate(chunk):
            values = {}
            for n in neurons:
                col = cap.neuron_indices[n.layer].tolist().index(n.index)
                pos = int(cap.positions[n.layer][i, col])
                values[str(n)] = {
                    "value": float(cap[n.layer][i, col]),
                    "token_index": pos,
                    "token": tokenizer.decode(batch["input_ids"][i, pos : pos + 1]),
                }
            rows.append({"doc_id": doc.doc_id, "text": doc.text, "neurons": values})
    print(format_capture_table(rows, neurons))
    if config.output:
        write_json(config.output, {"config": asdict(config), "rows": rows}, indent=2)
    return rows


def format_capture_table(rows: list[dict], neurons) -> str:
    names = [str(n) for n in neurons]
    header = f"{'document':<36} {'text':<44} " + " ".join(f"{name:>12}" for name in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        text = " ".join(row["text"].split())
        text = text[:41] + "..." if len(text) > 44 else text
        values = " ".join(f"{row['neurons'][name]['value']:>12.4f}" for name in names)
        lines.append(f"{row['doc_id'][:36]:<36} {text:<44} {values}")
    return "\n".join(lines)
