"""Generation speed: the book's fast path against Hugging Face, same weights.

    .venv/bin/python benchmarks/generation.py            # the table
    .venv/bin/python benchmarks/generation.py --rounds 5 --threads 2

Loads the shipped model (code/cave/_results/llama_shakespeare), exports it
to the Hugging Face layout (cave.transformers.llama.export_hf) and times,
for 250 and 1,000 new tokens, in float32 and bfloat16, batch 1, top-k 50,
KV cache on:

    book        cave.transformers.llama.generate (the LLaMA chapter's)
    fast        cave.frontiers.fast_generation.fast_generate
    speculative cave.frontiers.fast_generation.speculative_generate with the
                quick preset's model as the draft
    HF          transformers' LlamaForCausalLM.generate

All of them run in this one process, interleaved round by round, so that a
busy machine slows them alike; each cell is the best of --rounds. Then it
times `cave sample` with its defaults, as a user would start it, and prints
the machine's load. It lives outside the book because it imports
transformers (a reference library: tests and benchmarks only).
"""

from __future__ import annotations

import argparse
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
    draft, _, _ = LT.load_model(FG.DRAFT)
    prompt = torch.zeros(1, 1, dtype=torch.long)  # "\n", as cave sample
    rows = [(n, dt) for n in args.tokens
            for dt in (torch.float32, torch.bfloat16)]
    models = {dt: (model.to(dt), hf_model(model, dt),
                   FG.FastDecoder(model, dt), FG.FastDecoder(draft, dt))
              for dt in (torch.float32, torch.bfloat16)}
    best: dict = {}

    def keep(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    for r in range(args.rounds):
        for n, dt in rows:
            ours, hf, fast, small = models[dt]
            gen = lambda: torch.Generator().manual_seed(r)
            if n <= args.book_max:
                keep((n, dt, "book"), timed(lambda: generate(
                    ours, prompt, n, top_k=50, generator=gen())))
            keep((n, dt, "fast"), timed(lambda: FG.fast_generate(
                fast, prompt, n, top_k=50, generator=gen())))
            keep((n, dt, "spec"), timed(lambda: FG.speculative_generate(
                fast, small, prompt, n, top_k=50, generator=gen())))
            torch.manual_seed(r)
            keep((n, dt, "hf"), timed(lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt),
                max_new_tokens=n, min_new_tokens=n, do_sample=True,
                top_k=50, top_p=1.0, temperature=1.0, pad_token_id=0)))
    print(f"batch 1, top-k 50, torch threads {args.threads}, best of "
          f"{args.rounds} interleaved rounds; tokens per second of "
          f"{args.clock} time")
    print("| tokens | dtype | book `generate` | fast | speculative "
          "| HF `generate` | fast / HF | speculative / HF |")
    print("|---|---|---|---|---|---|---|---|")
    for n, dt in rows:
        rate = {k: n / best[(n, dt, k)] for k in ("book", "fast", "spec",
                                                  "hf") if (n, dt, k) in best}
        book = f"{rate['book']:.0f}" if "book" in rate else "-"
        print(f"| {n} | {str(dt).removeprefix('torch.')} | {book} | "
              f"{rate['fast']:.0f} | {rate['spec']:.0f} | {rate['hf']:.0f} "
              f"| {rate['fast'] / rate['hf']:.2f} | "
              f"{rate['spec'] / rate['hf']:.2f} |")
    cave = str(Path(sys.executable).with_name("cave"))
    walls = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        done = subprocess.run([cave, "sample", "--time", "--threads",
                               str(args.threads)], capture_output=True,
                              text=True)
        walls.append(time.perf_counter() - t0)
    print(f"`cave sample` (defaults: 500 tokens), best of {args.rounds}: "
          f"{min(walls):.2f} s wall; {done.stderr.strip()}")
    print("load (uptime):", subprocess.run(["uptime"], capture_output=True,
                                           text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
