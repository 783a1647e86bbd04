"""``nsr`` with a pause after every finished dataset shard, for tests/test_write_order.py's kill -9 test: the test waits
until a shard is on disk and kills the process during the pause, so the kill lands between shards by design, not by a
timing guess. The pause (seconds) is the environment variable ``NSR_TEST_SHARD_SLEEP``; nothing else differs from
``python -m nsr_hf.cli``.

    NSR_TEST_SHARD_SLEEP=2 python tests/scripts/slow_shards.py dataset --neurons 1.3 --shard_size 4 --output_dir out/ds
"""
import os
import sys
import time

from nsr_hf.cli import main
from nsr_hf.data.generator import ActivationDatasetGenerator

write_shard = ActivationDatasetGenerator._write_shard


def slow_write_shard(self, *args, **kwargs):
    manifest = write_shard(self, *args, **kwargs)
    time.sleep(float(os.environ.get("NSR_TEST_SHARD_SLEEP", "0")))
    return manifest


if __name__ == "__main__":
    ActivationDatasetGenerator._write_shard = slow_write_shard
    sys.exit(main(sys.argv[1:]))
