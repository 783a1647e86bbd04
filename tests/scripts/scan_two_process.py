"""A scan under ``accelerate launch`` that records what each process saw (used by tests/test_scanner.py).

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/scan_two_process.py RECORD_DIR --model DIR --corpus FILE ...

Arguments after RECORD_DIR are ``ScanConfig`` fields. Each process writes ``RECORD_DIR/process_<rank>.json``
with the number of processes it saw, its rank, and the documents each process scanned; the main process
also writes the scan's outputs into ``--output_dir``.
"""
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from nsr_hf.scanner import ScanConfig, distributed_state, run_scan

record_dir = Path(sys.argv[1])
(config,) = HfArgumentParser(ScanConfig).parse_args_into_dataclasses(args=sys.argv[2:])
state = distributed_state()
result = run_scan(config)
record = {
    "num_processes": state.num_processes,
    "process_index": state.process_index,
    "documents_per_process": result.metadata["documents_per_process"],
    "neuron_at_rank_1": str(result.neuron_at_rank(1)),
}
(record_dir / f"process_{state.process_index}.json").write_text(json.dumps(record))
