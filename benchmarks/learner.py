"""Learner step at a realistic vocabulary: peak memory and tokens/s against the naive step.

`python -m benchmarks.learner --json PATH`

On Llama-shaped models built here with random weights (vocabularies of 32,000 and 151,936, the
latter Qwen2.5's), one batch of reflection rows with prompts of ~1-1.5k tokens, three steps run
side by side in one process, interleaved, on the same LoRA model and the same batch:
- `ours`: the learner's step (`learner.update.gradient_step`): the transformer body, hidden
  states gathered at the reflection tokens, chunked fp32 log-softmax over the vocabulary for those
  rows only, the REINFORCE loss, backward, clip, AdamW; since issue 10 also the logged entropy
  (in the same chunked pass as the log-probs; no gradient at entropy_coef 0) and, with kl_coef 0,
  the KL log's reference forward over one row (LoRA disabled, no gradient) on every
  KL_LOG_EVERY-th step (the batch's reference is not cached here, as for fresh rows), which the
  naive variant pays too, on its own schedule.
- `naive`: the same step with today's (pre-issue-9) log-probs: full-vocabulary logits and a
  log-softmax at every prompt position (`PolicyModel.reference_logprobs`).
- `bare`: the floor any learner step of this model pays: forward + backward of the same LoRA
  model's body and AdamW, with a trivial loss (the mean of the hidden states at the reflection
  positions) and no LM head at all. `tokens_per_s_vs_bare` is the share of that floor our step
  keeps: what the LM head, the loss and batching cost on top.

Peak memory: in a fresh process per variant, after one warm-up step, the highest RSS a 1 ms
sampling thread sees during one more step, minus the RSS just before it; glibc is told to mmap
every allocation of 64 KiB or more (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS and
the figure is the step's own working memory. Timing: one more fresh process per vocabulary runs
the three steps interleaved, REPS times, after a warm-up. Targets: `peak_mem_vs_naive_152k` <= 0.3,
`tokens_per_s_vs_bare` >= 0.9 (the 152k model, the harder case; a median of paired ratios).
`tokens_per_s_vs_bare_*_total` (total times over the REPS steps, REPS = KL_LOG_EVERY) counts the
KL log's reference forward at its amortised share.

The LM head's share of the step's FLOPs is 2·V·H per reflection token against ~24·n·H² per token
of the body (plus attention); a 1.5B reflector with a 152k vocabulary, 3k-token prompts and 128
reflection tokens spends <1% there, these small models more (`head_flops_share`, reported), so
the ratio here is a lower bound for the real model.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import write_json

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False)
VOCABS = (32000, 151936)
ROWS, PROMPT_TOKENS, REFLECTION_TOKENS = 4, (900, 1500), (16, 33)
REPS = 4  # interleaved repetitions; ratios are medians of the per-repetition (paired) ratios


def build_model(vocab: int, folder: Path) -> None:
    """A Llama-shaped checkpoint with random weights; the tiny model's tokenizer (the learner only
    reads its pad id and encodes the probe; the batch's token ids are drawn over the full vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 **SHAPE)).save_pretrained(folder)
    tiny = ROOT / "models" / "tiny-lm"
    for f in tiny.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)


def make_rows(vocab: int):
    import numpy as np

    from retro_dist.learner.batches import Rows

    g = np.random.default_rng(0)
    prompts = [g.integers(4, vocab, size=int(g.integers(*PROMPT_TOKENS))).tolist() for _ in range(ROWS)]
    refl = [g.integers(4, vocab, size=int(g.integers(*REFLECTION_TOKENS))).tolist() for _ in range(ROWS)]
    behaviour = [(-g.random(len(r)) * 10).tolist() for r in refl]
    return Rows(prompts, refl, behaviour, g.normal(size=ROWS), np.zeros(ROWS), np.ones(ROWS), np.zeros(ROWS, int))


class PeakRSS:
    """Highest RSS seen by a 1 ms sampling thread while the `with` block runs, minus RSS at entry."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mib = (self.peak - self.base) / 2**20


def bare_step(policy, optimizer, rows, max_grad_norm: float) -> None:
    import torch

    from retro_dist.learner.batches import micro_batch

    optimizer.zero_grad(set_to_none=True)
    mb = micro_batch(rows, list(range(len(rows))), policy.tokenizer.pad_token_id)
    hidden = policy.body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).last_hidden_state
    b, t = mb.mask.nonzero(as_tuple=True)
    hidden[b, mb.positions[b, t]].mean().backward()
    torch.nn.utils.clip_grad_norm_(policy.params, max_grad_norm)
    optimizer.step()


def run_vocab(vocab: int, folder: str, variants: tuple, reps: int, out) -> None:
    """In a fresh process: one warm-up step per variant, then either the peak memory of one more
    step (`reps` 0, one variant) or `reps` interleaved timed steps of every variant."""
    import torch

    from retro_dist.config import LearnerConfig, ReflectorConfig
    from retro_dist.learner.distributed import Group
    from retro_dist.learner.policy import KLLog, PolicyModel, ReflectionOutputs
    from retro_dist.learner.update import gradient_step

    torch.set_num_threads(2)
    cfg = LearnerConfig(micro_batch_size=ROWS, precision="fp32")
    policy = PolicyModel(ReflectorConfig(model=folder, lora_rank=8), cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.params, lr=1e-4)
    rows = make_rows(vocab)
    fast = policy.forward

    def naive(mb, entropy=False, entropy_grad=False):
        # full-vocabulary log-probs at every position; the logged entropy and prompt state are not
        # part of this comparison (both variants pay the KL's reference forward alike)
        lp = policy.reference_logprobs(mb)
        return ReflectionOutputs(lp, torch.zeros_like(lp).detach(), lp.new_zeros(lp.shape[0], 1))

    kl_logs = {v: KLLog() for v in variants}  # each variant's own step count: its own KL-log schedule

    def step(variant: str) -> None:
        if variant == "bare":
            return bare_step(policy, optimizer, rows, cfg.max_grad_norm)
        policy.forward = fast if variant == "ours" else naive
        policy.kl_log = kl_logs[variant]
        gradient_step(policy, optimizer, cfg, rows, Group(), version=0)

    result = {v: {"seconds": []} for v in variants}
    for v in variants:
        step(v)  # warm-up
    if reps == 0:
        with PeakRSS() as peak:
            step(variants[0])
        result[variants[0]]["peak_mib"] = peak.mib
    for _ in range(reps):
        for v in variants:
            t0 = time.perf_counter()
            step(v)
            result[v]["seconds"].append(time.perf_counter() - t0)
    tokens = sum(rows.lengths())
    for v in variants:
        if reps:
            result[v]["tokens_per_s"] = tokens / statistics.median(result[v]["seconds"])
    out.put((tokens, sum(len(r) for r in rows.reflection_ids), result))


def _in_fresh_process(*args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=run_vocab, args=(*args, q))
    p.start()
    got = q.get()
    p.join()
    return got


def measure(vocab: int, folder: Path) -> dict:
    variants = ("ours", "naive", "bare")
    tokens, refl, result = _in_fresh_process(vocab, str(folder), variants, REPS)
    for v in variants:  # memory: a fresh process per variant, so no step inherits another's heap
        result[v]["peak_mib"] = _in_fresh_process(vocab, str(folder), (v,), 0)[2][v]["peak_mib"]
    h, n = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    head = 2 * vocab * h * refl
    body = tokens * 2 * n * (4 * h * h + 3 * h * SHAPE["intermediate_size"])
    return {"vocab": vocab, "tokens": tokens, "reflection_tokens": refl,
            "head_flops_share": head / (head + body), "variants": result}


def _paired(baseline_seconds: list, ours_seconds: list) -> float:
    return statistics.median(b / o for b, o in zip(baseline_seconds, ours_seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the figures")
    args = ap.parse_args()
    # glibc returns allocations of >= 64 KiB to the OS on free (children inherit the setting), so
    # RSS follows the live tensors instead of a heap that keeps what an earlier step freed
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    runs = []
    with tempfile.TemporaryDirectory(prefix="retro_bench_learner_") as tmp:
        for vocab in VOCABS:
            folder = Path(tmp) / f"llama-{vocab}"
            build_model(vocab, folder)
            runs.append(measure(vocab, folder))
    print(f"{'vocab':>7} {'variant':>6} {'peak MiB':>9} {'tokens/s':>9}")
    out = {"shape": SHAPE, "rows": ROWS, "runs": runs}
    for r in runs:
        for v, s in r["variants"].items():
            print(f"{r['vocab']:>7} {v:>6} {s['peak_mib']:>9.0f} {s['tokens_per_s']:>9.0f}")
        k = "152k" if r["vocab"] > 100_000 else "32k"
        ours, naive, bare = (r["variants"][v] for v in ("ours", "naive", "bare"))
        out[f"peak_mem_vs_naive_{k}"] = ours["peak_mib"] / naive["peak_mib"]
        # paired: repetition i of each variant ran back to back, so a busy moment on the shared
        # machine slows all three alike; the median of the per-repetition ratios discards outliers
        out[f"tokens_per_s_vs_naive_{k}"] = _paired(naive["seconds"], ours["seconds"])
        out[f"tokens_per_s_vs_bare_{k}"] = _paired(bare["seconds"], ours["seconds"])
        # total time over the REPS steps: the KL log's fresh reference forward (one step in
        # KL_LOG_EVERY) amortised, where the median can drop the step that pays it
        out[f"tokens_per_s_vs_bare_{k}_total"] = sum(bare["seconds"]) / sum(ours["seconds"])
    out["tokens_per_s_vs_bare"] = out["tokens_per_s_vs_bare_152k"]
    out["targets"] = {"peak_mem_vs_naive_152k": "<= 0.3", "tokens_per_s_vs_bare": ">= 0.9"}
    for k in ("peak_mem_vs_naive_32k", "peak_mem_vs_naive_152k", "tokens_per_s_vs_naive_152k",
              "tokens_per_s_vs_bare_32k", "tokens_per_s_vs_bare", "tokens_per_s_vs_bare_32k_total",
              "tokens_per_s_vs_bare_152k_total"):
        print(f"{k}: {out[k]:.3f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
