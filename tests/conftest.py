import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small demo corpus (WAVs -> features -> Parquet), built once per test session."""
    import demo_corpus
    out = tmp_path_factory.mktemp("corpus")
    shards = demo_corpus.build(out, n_conversations=8, seed=1, rows_per_shard=20, rows_per_group=5)
    return out / "parquet", shards
