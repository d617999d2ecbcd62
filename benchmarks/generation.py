"""Generation speed: the book's fast path against Hugging Face, same weights.

    .venv/bin/python benchmarks/generation.py            # the table
    .venv/bin/python benchmarks/generation.py --rounds 5 --threads 2

Loads the shipped model (code/cave/_results/llama_shakespeare), exports it
to the Hugging Face layout (cave.transformers.llama.export_hf) and times,
for 250 and 1,000 new tokens, in float32 and bfloat16, batch 1, top-k 50,
KV cache on:

    book        cave.transformers.llama.generate (the LLaMA chapter's)
    fast        cave.frontiers.fast_generation.fast_generate
    fast f16    the same on the bfloat16 weights held in float16 (exact
                but for the few below float16's normal range), whose
                kernels some CPUs run faster; bfloat16 rows only
    spec quick  cave.frontiers.fast_generation.speculative_generate with the
                quick preset's model (float32) as the draft
    spec n-gram the same with the Shakespeare training split's n-gram
                counts as the draft (shakespeare_draft), NGRAM_DRAFT_TOKENS
                drafts a round, as `cave sample`; "f16" again the
                float16 kernels on the bfloat16 weights
    int8        the fast decoder with int8 weights (the compression
                chapter's per-channel grid) and bfloat16 activations, alone
                and with the n-gram draft; bfloat16 rows only
    HF          transformers' LlamaForCausalLM.generate

The shipped weights are bfloat16 numbers, so every column but the int8
ones computes with the same weights; the float32 rows compute in float32,
the bfloat16 rows (but f16) in bfloat16. "best book / HF" takes the best
column on the same weights; "int8 / HF" the best int8 column, whose
weights are rounded.

All of them run in this one process, interleaved round by round, so that a
busy machine slows them alike; each cell is the best of --rounds. Then it
times `cave sample` with its defaults, as a user would start it, and prints
the machine's load. It lives outside the book because it imports
transformers (a reference library: tests and benchmarks only).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from cave.frontiers import fast_generation as FG
from cave.transformers import llama_training as LT
from cave.transformers.llama import export_hf, generate

ROOT = Path(__file__).resolve().parents[1]


def hf_model(model, dtype):
    state, config = export_hf(model)
    hf_config = transformers.LlamaConfig(**config)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(state, strict=True)
    return hf.to(dtype)


CLOCK = time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--book-max", type=int, default=250,
                        help="time the old `generate` only up to this many "
                             "tokens (past the window it recomputes)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier on a "
                             "busy machine with one thread")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model, _, _ = LT.load_model(LT.SHIPPED)
    draft, tokenizer, _ = LT.load_model(FG.DRAFT)
    counts = FG.shakespeare_draft(tokenizer)
    prompt = torch.zeros(1, 1, dtype=torch.long)  # "\n", as cave sample
    rows = [(n, dt) for n in args.tokens
            for dt in (torch.float32, torch.bfloat16)]
    small = FG.FastDecoder(draft)  # float32: the draft is small
    models = {dt: (copy.deepcopy(model).to(dt), hf_model(model, dt),
                   FG.FastDecoder(model, dt))
              for dt in (torch.float32, torch.bfloat16)}
    f16 = FG.FastDecoder(model, torch.float16)
    int8 = FG.FastDecoder(model, torch.bfloat16, int8=True)
    best: dict = {}
    K = FG.NGRAM_DRAFT_TOKENS  # drafts a round with the counts

    def keep(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    for r in range(args.rounds):
        for n, dt in rows:
            ours, hf, fast = models[dt]
            gen = lambda: torch.Generator().manual_seed(r)
            if n <= args.book_max:
                keep((n, dt, "book"), timed(lambda: generate(
                    ours, prompt, n, top_k=50, generator=gen())))
            keep((n, dt, "fast"), timed(lambda: FG.fast_generate(
                fast, prompt, n, top_k=50, generator=gen())))
            if dt == torch.bfloat16:
                keep((n, dt, "f16"), timed(lambda: FG.fast_generate(
                    f16, prompt, n, top_k=50, generator=gen())))
            keep((n, dt, "spec"), timed(lambda: FG.speculative_generate(
                fast, small, prompt, n, top_k=50, generator=gen())))
            keep((n, dt, "ngram"), timed(lambda: FG.speculative_generate(
                fast, counts, prompt, n, K, top_k=50, generator=gen())))
            if dt == torch.bfloat16:
                keep((n, dt, "ngram16"), timed(
                    lambda: FG.speculative_generate(
                        f16, counts, prompt, n, K, top_k=50,
                        generator=gen())))
                keep((n, dt, "int8"), timed(lambda: FG.fast_generate(
                    int8, prompt, n, top_k=50, generator=gen())))
                keep((n, dt, "ngram8"), timed(
                    lambda: FG.speculative_generate(
                        int8, counts, prompt, n, K, top_k=50,
                        generator=gen())))
            torch.manual_seed(r)
            keep((n, dt, "hf"), timed(lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt),
                max_new_tokens=n, min_new_tokens=n, do_sample=True,
                top_k=50, top_p=1.0, temperature=1.0, pad_token_id=0)))
    print(f"batch 1, top-k 50, torch threads {args.threads}, best of "
          f"{args.rounds} interleaved rounds; tokens per second of "
          f"{args.clock} time")
    columns = ("book", "fast", "f16", "int8", "spec", "ngram", "ngram16",
               "ngram8", "hf")
    print("| tokens | dtype | book `generate` | fast | fast f16 | fast int8 "
          "| spec quick | spec n-gram | spec n-gram f16 | spec n-gram int8 "
          "| HF `generate` | best book / HF | int8 / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, dt in rows:
        rate = {k: n / best[(n, dt, k)] for k in columns
                if (n, dt, k) in best}
        cell = " | ".join(f"{rate[k]:.0f}" if k in rate else "-"
                          for k in columns)
        top = max(v for k, v in rate.items()
                  if k not in ("hf", "int8", "ngram8"))
        int8_top = max((v for k, v in rate.items()
                        if k in ("int8", "ngram8")), default=None)
        int8_ratio = "-" if int8_top is None else \
            f"{int8_top / rate['hf']:.2f}"
        print(f"| {n} | {str(dt).removeprefix('torch.')} | {cell} | "
              f"{top / rate['hf']:.2f} | {int8_ratio} |")
    cave = str(Path(sys.executable).with_name("cave"))
    for extra in ([], ["--dtype", "bfloat16"], ["--dtype", "float16"],
                  ["--draft", "none"]):
        command = [cave, "sample", *extra, "--time"]
        walls, said, built = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            said.append(float(done.stderr.split("tokens in ")[1].split()[0]))
            built.append(float(done.stderr.split("draft took ")[1].split()[0])
                         if "draft took " in done.stderr else 0.0)
        print(f"`{' '.join(['cave', 'sample', *extra])}` (500 tokens), best "
              f"of {args.rounds}: {min(walls):.2f} s wall in all, "
              f"{min(said):.2f} s of it generating, {min(built):.2f} s "
              f"building the n-gram draft")
    print("load (uptime):", subprocess.run(["uptime"], capture_output=True,
                                           text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
