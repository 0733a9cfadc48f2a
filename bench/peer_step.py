"""Training-step throughput against peers: our CustomTransformer against Hugging Face
transformers' LlamaForCausalLM and ModernBertForMaskedLM of the same width, depth and
parameter count.

    python bench/peer_step.py [--lengths 1024 4096 16384 65536] [--budget-s 300]

One full step (forward, backward, AdamW) on one sequence of n positions, each (model, n) in a
fresh process, fp32 on CPU (the trainer's choice there). Ours runs the `small` preset's shape
(d 192, 6 layers, 4 heads) as configured (layers LLS: two in three slide a 64-position window,
the third is sparse global), with dense global layers instead (LLG) and all-local (L), text-only
and with every modality (the
audio frames, prosody, speaker and sentiment slots of the synthetic long-context document).
Llama gets the same width, depth, heads and FFN, full causal SDPA attention; ModernBERT (a
bidirectional masked-language model, the nearest peer of our masked autoencoder) the same, with
its own pattern: a global layer in three, the others a 128-position window, SDPA attention (its
windows are masks over the whole sequence without FlashAttention, which this CPU has not). A
case whose time, extrapolated from the previous length, would exceed the budget is not run and
says so. Headline: tokens/s of ours (default LLS, text only) over Llama and ModernBERT at 16k.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import ROOT, header, run_case, save

import config  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402
from long_context import synthetic_document  # noqa: E402

MODELS = {  # name -> (layer pattern, or the peer's name, input)
    "llama": ("llama", "text"),
    "modernbert": ("modernbert", "text"),
    "ours-LLS-text": ("LLS", "text"),
    "ours-LLG-text": ("LLG", "text"),
    "ours-L-text": ("L", "text"),
    "ours-LLS-all": ("LLS", "all"),
    "ours-L-all": ("L", "all"),
}


def small_config(pattern: str | None):
    overrides = [f"model.layer_pattern={pattern}"] if pattern else []
    return config.load_config(str(ROOT / "config.yaml"), overrides, "small").model


def llama(n: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    m = small_config(None)
    head_dim = m.d_model // m.n_heads
    config = LlamaConfig(hidden_size=m.d_model, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
                         num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, head_dim=head_dim,
                         vocab_size=m.vocab_size, max_position_embeddings=n, rope_theta=m.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    ids = torch.randint(4, m.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def modernbert(n: int):
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    m = small_config(None)
    config = ModernBertConfig(hidden_size=m.d_model, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
                              num_attention_heads=m.n_heads, vocab_size=m.vocab_size, max_position_embeddings=n,
                              global_attn_every_n_layers=3, local_attention=128, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation="sdpa")
    model = ModernBertForMaskedLM(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, m.vocab_size, (1, n), generator=generator)
    labels = torch.where(torch.rand(1, n, generator=generator) < 0.3, ids, -100)   # the masked positions
    return model, lambda: model(input_ids=ids, labels=labels).loss


def ours(n: int, pattern: str, inputs: str):
    m = small_config(pattern)
    model = CustomTransformer(m)
    batch = synthetic_document(n, m.frames_per_position, audio=inputs == "all")
    masks = sample_masks(batch, m, torch.Generator().manual_seed(0))
    return model, lambda: model(batch, masks)[0]


def case(name: str, n: int, steps: int) -> dict:
    torch.manual_seed(0)
    pattern, inputs = MODELS[name]
    peers = {"llama": llama, "modernbert": modernbert}
    model, loss_of = peers[pattern](n) if pattern in peers else ours(n, pattern, inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        optimizer.step()
        return loss.detach()

    step()   # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "tokens_per_s": n / seconds, "loss": loss.item(),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "N", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--budget-s", type=float, default=300.0, help="the most one case may be expected to take")
    args = parser.parse_args()
    if args.case:
        name, n, steps = args.case
        print(json.dumps(case(name, int(n), int(steps))))
        return 0

    lines = [*header(),
             "# tokens/s of one training step (forward, backward, AdamW), fp32; ratio = ours / llama (/ modernbert)"]
    columns = (f"{'n':>7}" + "".join(f"{name:>15}" for name in MODELS)
               + f"{'LLS-text x':>12}{'LLG-text x':>12}{'L-text x':>10}{'LLS/MBERT x':>13}")
    lines.append(columns)
    print("\n".join(lines), flush=True)
    last: dict[str, tuple[int, float]] = {}
    results: dict[tuple[str, int], dict] = {}
    parameters = {}
    for n in args.lengths:
        row = f"{n:>7}"
        for name in MODELS:
            steps = 3 if n <= 4096 else 1
            if name in last:   # attention grows as n^2 at worst: extrapolate before running
                previous_n, previous_s = last[name]
                expected = previous_s * (n / previous_n) ** 2 * (steps + 1)
                if expected > args.budget_s:
                    results[name, n] = {"error": f"expected ~{expected:.0f} s"}
                    row += f"{'over budget':>15}"
                    continue
            result = run_case(__file__, name, str(n), str(steps), timeout=4 * args.budget_s)
            results[name, n] = result
            if "seconds" in result:
                last[name] = (n, result["seconds"])
                parameters[name] = result["parameters"]
                row += f"{result['tokens_per_s']:>15,.0f}"
            else:
                row += f"{'failed':>15}"
        for ours_name, peer, width in (("ours-LLS-text", "llama", 12), ("ours-LLG-text", "llama", 12),
                                       ("ours-L-text", "llama", 10), ("ours-LLS-text", "modernbert", 13)):
            a, b = results.get((ours_name, n), {}), results.get((peer, n), {})
            row += f"{a['tokens_per_s'] / b['tokens_per_s']:>{width}.2f}" if "seconds" in a and "seconds" in b else f"{'-':>{width}}"
        lines.append(row)
        print(row, flush=True)
    lines.append("parameters: " + ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in parameters.items()))
    notes = [f"{name} at {n}: {r['error']}" for (name, n), r in results.items() if "error" in r]
    lines += [f"not run or failed: {note}" for note in notes]
    a, b, c = (results.get((name, 16384), {}) for name in ("ours-LLS-text", "llama", "modernbert"))
    headline = (f"tokens/s at 16k, ours (small, LLS, text only) / llama: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                f"(goal >= 4x), / modernbert: {a['tokens_per_s'] / c['tokens_per_s']:.2f}x (goal >= 12x)"
                if all("seconds" in r for r in (a, b, c)) else "tokens/s at 16k: not measured")
    lines.append(headline)
    print("\n".join(lines[-len(notes) - 2:]))
    save("peer_step", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
