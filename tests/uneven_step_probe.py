"""One optimizer step under torchrun with uneven work: rank 0 trains on three batches, rank 1 on
one (shares 3:1). Rank 0 writes the weights after the step, for a test to compare with one
process stepping on the union of the four batches.

    torchrun --nproc_per_node 2 tests/uneven_step_probe.py CORPUS_DIR OUT.pt ddp|fsdp
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

import config  # noqa: E402
import model_trainer  # noqa: E402
import packing  # noqa: E402
import parallel  # noqa: E402
import schema  # noqa: E402
from custom_transformer import CustomTransformer  # noqa: E402
from util import step_batches  # noqa: E402

# Sequences per batch. DDP: rank 0 accumulates the first three batches, rank 1 the last. FSDP
# (every forward collective): one batch each, rank 0's three times the size.
SIZES = {"ddp": [1, 2, 1, 2], "fsdp": [3, 1]}


def main(corpus: str, out: str, mode: str) -> None:
    ranks = parallel.init_distributed("cpu")
    cfg = config.load_config(str(config.DEFAULT_CONFIG), [], "tiny")
    shards = sorted(Path(corpus).glob("*.parquet"))
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    pairs, _, _ = step_batches(shards, layout, cfg.model, SIZES[mode])
    mine = (pairs[:3] if ranks.rank == 0 else pairs[3:]) if mode == "ddp" else [pairs[ranks.rank]]
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(schema.corpus_info({str(s): schema.read_metadata(pq.read_schema(s), str(s))
                                                 for s in shards}))
    trained = parallel.distribute(model, mode, ranks, torch.device("cpu"))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = model_trainer.train_step(trained, mine, optimizer, scheduler, scaler, torch.device("cpu"),
                                      torch.float32, grad_clip=1e9)
    state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ranks.main:
        torch.save({"weights": state, "loss": result.loss}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
