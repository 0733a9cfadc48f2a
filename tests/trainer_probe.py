"""model_trainer.py with a probe, for the torchrun tests: every rank appends the sample ids of
each batch it trains on to $PROBE_DIR/rank-N.jsonl, so a test can check what each rank saw."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import model_trainer  # noqa: E402

record = datasets._PackedStream.record


def logged_record(self, batch):
    with open(Path(os.environ["PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": batch.resume_from[0], "ids": batch.sample_ids}) + "\n")
    record(self, batch)


datasets._PackedStream.record = logged_record
if __name__ == "__main__":   # not in spawned DataLoader workers, which import this file
    model_trainer.cli()
