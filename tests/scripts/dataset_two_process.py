"""Run by tests/test_dataset_generator.py under ``accelerate launch --multi_gpu --num_processes 2`` (two CPU
processes over gloo): generate a dataset with the tiny model, keeping the shards so the test can see which
process computed each.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/dataset_two_process.py MODEL_DIR CORPUS OUTPUT_DIR
"""
import json
import sys
from pathlib import Path

from nsr_hf.data.generator import ActivationDatasetGenerator, DatasetConfig


def main(model_dir: str, corpus: str, output_dir: str) -> None:
    config = DatasetConfig(neurons=["1.3", "0.5"], model=model_dir, corpus=corpus, id_field="id", max_length=16, batch_size=8,
                           shard_size=8, output_dir=output_dir, keep_shards=True)
    generator = ActivationDatasetGenerator(config)
    dataset_dict = generator.generate()
    state = generator.state
    report = {"process_index": state.process_index, "num_processes": state.num_processes,
              "rows": {split: len(ds) for split, ds in dataset_dict.items()}, **generator.shard_counts}
    Path(output_dir, f"process-{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
