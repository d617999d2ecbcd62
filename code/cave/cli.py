"""The `cave` command line: the book's only argparse.

    cave train   train the LLaMA of docs/transformers/llama_training.md
                 (under torchrun --nproc-per-node N: data-parallel, as
                 docs/scale/distributed.md builds it)
    cave sample  sample from a checkpoint (the shipped model by default)
    cave bench   measure speed; record the results
    cave run     run a chapter's page, or with --full its full training run

Not a chapter: it is written by hand and only turns arguments into calls
of the chapters' functions. Every failure is one line on stderr and an
exit status: 1 a missing or damaged checkpoint, or a chapter that failed;
2 a bad command line. CAVE_TRACEBACK=1 shows the traceback of an
unexpected error instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

from cave.fundamentals.checkpoints import CheckpointError, record_results

USAGE, BROKEN = 2, 1  # exit statuses


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


class RunFailed(RuntimeError):
    """A chapter's fence or full run failed: one line, exit status 1."""


# --------------------------------------------------------------------------
# key=value overrides
# --------------------------------------------------------------------------


def parse_value(text: str, kind: str):
    """A command-line string as the type a dataclass field names."""
    if "None" in kind and text.lower() == "none":
        return None
    base = kind.replace("| None", "").strip()
    if base == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return {"int": int, "float": float, "str": str}[base](text)


def guess_value(text: str):
    """A `cave run --full` override: int, float, true/false, else text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def split_override(item: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UsageError(f"expected key=value, got {item!r}")
    return key, text


def apply_overrides(train_kw: dict, model_kw: dict,
                    overrides: list[str]) -> tuple[dict, dict]:
    """key=value strings applied to the LLaMA's train and model keywords."""
    from cave.transformers.llama import LlamaConfig
    from cave.transformers.llama_training import TrainConfig

    train_kw, model_kw = dict(train_kw), dict(model_kw)
    fields = {f.name: (train_kw, str(f.type))
              for f in dataclasses.fields(TrainConfig)}
    fields.update({f.name: (model_kw, str(f.type))
                   for f in dataclasses.fields(LlamaConfig)
                   if f.name != "vocab_size"})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"override {item!r}: expected key=value with "
                             f"key one of {', '.join(sorted(fields))}")
        target, kind = fields[key]
        try:
            target[key] = parse_value(text, kind)
        except (ValueError, KeyError) as err:
            raise UsageError(f"override {item!r}: {err}") from None
    return train_kw, model_kw


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started, or that already belongs
    to a process group (the distributed chapter's `launch` makes them)."""
    import torch.distributed as dist

    return "TORCHELASTIC_RUN_ID" in os.environ or (
        dist.is_available() and dist.is_initialized())


def checked_device(name: str | None) -> str | None:
    """The --device value, refused in one line if this PyTorch lacks it."""
    if name is None:
        return None
    from cave.fundamentals.essentials import pick_device

    try:
        return str(pick_device(name))
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError instead of exiting
    with the usage text, so that main reports it in one line."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> Parser:
    from cave.transformers.llama_training import PRESETS

    parser = Parser(prog="cave", description="The Deep Learning Cave's "
                    "command: train and sample the book's LLaMA, measure "
                    "its speed, run any chapter.")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=Parser)
    t = sub.add_parser("train", help="train a LLaMA (key=value overrides)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any TrainConfig or LlamaConfig field")
    t.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    t.add_argument("--out", type=Path, default=None,
                   help="folder for checkpoints and log.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue from --out's latest checkpoint")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1...")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step, as an interruption would")
    t.add_argument("--record", default=None, metavar="NAME",
                   help="store the run's results under NAME in "
                        "_results/llama_training.json")
    t.add_argument("--export", type=Path, default=None,
                   help="also write the final model (weights in bfloat16)"
                        " and config.json to this folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="a run folder or a model folder (default: the "
                        "shipped model)")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true",
                   help="recompute the whole window at every token (slow; "
                        "the same text as --draft none --dtype float32)")
    s.add_argument("--draft", choices=("ngram", "none"), default="ngram",
                   help="ngram: speculative decoding drafted by the "
                        "Shakespeare training text's n-gram counts, when "
                        "the model reads its characters (text from the "
                        "same distribution, faster); none: one token at a "
                        "time")
    s.add_argument("--device", default="cpu")
    s.add_argument("--time", action="store_true",
                   help="print the seconds spent generating on stderr")
    s.add_argument("--dtype", choices=("auto", "float32", "bfloat16",
                                       "float16"), default="auto",
                   help="the decoder's dtype; auto: bfloat16 when every "
                        "weight of the checkpoint is a bfloat16 number (the "
                        "shipped model's are: it computes with the very "
                        "weights, at half the bytes), else float32; float16 "
                        "holds bfloat16 weights too, and runs faster on "
                        "some CPUs")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: one token at a time, a "
                        "second thread mostly waits, and on a busy machine "
                        "waits long)")
    b = sub.add_parser("bench", help="measure speed; record the results")
    b.add_argument("--skip-train", action="store_true",
                   help="only the matrix-product peak and generation")
    b.add_argument("--no-record", action="store_true")
    r = sub.add_parser("run", help="run a chapter's page; with --full, its "
                       "full training run, recorded in _results/")
    r.add_argument("chapter", help="a chapter's stem (cnn) or part/stem")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --full: overrides of the chapter's training "
                        "config")
    r.add_argument("--full", action="store_true",
                   help="call the chapter's full_run and record its result")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1...")
    r.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the record to PATH instead of _results/ "
                        "(for trial runs)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv; key=value words after an option join the overrides
    (argparse alone takes positionals only from one stretch)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    return args


# --------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------


def cmd_train(args, argv: list[str]) -> int:
    from cave.fundamentals.data import shakespeare_split
    from cave.transformers.llama import LlamaConfig
    from cave.transformers import llama_training as L

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: expected a folder (new or a "
                         f"run's), found a file")
    preset = L.PRESETS[args.preset]
    train_kw, model_kw = preset["train"], preset["model"]
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out, the run's folder")
        train_kw, model_kw = L.saved_configs(args.out)  # its configs win
    train_kw, model_kw = apply_overrides(train_kw, model_kw, args.overrides)
    device = checked_device(args.device)
    if device is not None:
        train_kw["device"] = device
    try:
        config = L.TrainConfig(**train_kw)
        model_config = LlamaConfig(**model_kw)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    stream = None if args.quiet else sys.stderr
    if launched_by_torchrun():  # torchrun --nproc-per-node N: one rank
        from cave.scale.distributed import torchrun_train

        summary = torchrun_train(config, model_config, args.out,
                                 resume=args.resume, stop_at=args.stop_at,
                                 stream=stream)
        if summary is None:  # not rank 0, which alone reports and writes
            return 0
    else:
        summary = L.train(config, model_config, args.out,
                          resume=args.resume, stop_at=args.stop_at,
                          stream=stream,
                          sample_chars=200 if args.record else 0)
    where = f" | checkpoint {args.out}" if args.out is not None else ""
    val = summary["val_loss"]
    print(f"val_loss {'-' if val is None else f'{val:.4f}'} | tokens "
          f"{summary['tokens']:,} | {summary['seconds']:.1f} s{where}")
    if args.export is not None:
        tokenizer, _, _ = shakespeare_split()
        L.export_model(summary["model"], tokenizer, config, args.export)
    if args.record:
        keep = {k: v for k, v in summary.items() if k != "model"}
        record = {"preset": args.preset,
                  "train": dataclasses.asdict(config),
                  "model": dataclasses.asdict(summary["model"].config),
                  **keep}
        record_results("llama_training", record, command(argv),
                       entry=args.record)
    return 0


def stored_dtype(model):
    """bfloat16 if every weight of model is a bfloat16 number (the
    shipped checkpoint stores them so), else float32."""
    import torch

    bf16 = all(torch.equal(p, p.bfloat16().to(p.dtype))
               for p in model.parameters())
    return torch.bfloat16 if bf16 else torch.float32


def cmd_sample(args) -> int:
    import time

    import torch

    from cave.frontiers.fast_generation import (NGRAM_DRAFT_TOKENS,
                                                FastDecoder, fast_generate,
                                                shakespeare_draft,
                                                speculative_generate)
    from cave.transformers import llama_training as L

    if args.tokens < 0:
        raise UsageError(f"--tokens must be >= 0, got {args.tokens}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = checked_device(args.device)
    model, tokenizer, _ = L.load_model(args.checkpoint or L.SHIPPED, device)
    prompt = tokenizer.encode(args.prompt or "\n")[None]  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.no_cache and args.dtype not in ("auto", "float32"):
        raise UsageError("--no-cache runs the float32 model; drop --dtype")
    draft, built = None, time.perf_counter()
    if args.draft == "ngram" and not args.no_cache:
        try:
            draft = shakespeare_draft(tokenizer)
        except ValueError:  # another alphabet: no counts to draft from
            draft = None
    built = time.perf_counter() - built
    start = time.perf_counter()
    if not args.no_cache:
        model = FastDecoder(model, getattr(torch, args.dtype) if
                            args.dtype != "auto" else stored_dtype(model))
    sampling = dict(temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, generator=generator)
    if draft is not None:
        out, _ = speculative_generate(model, draft, prompt.to(device),
                                      args.tokens, NGRAM_DRAFT_TOKENS,
                                      **sampling)
    else:
        out = fast_generate(model, prompt.to(device), args.tokens,
                            use_cache=not args.no_cache, **sampling)
    seconds = time.perf_counter() - start  # out: (1, T + tokens)
    print(tokenizer.decode(out[0]))
    if args.time:
        drafted = (f"; building the n-gram draft took {built:.2f} s"
                   if draft is not None else "")
        print(f"generated {args.tokens} tokens in {seconds:.2f} s{drafted}",
              file=sys.stderr)
    return 0


def cmd_bench(args, argv: list[str]) -> int:
    import torch

    from cave.frontiers import fast_generation as FG
    from cave.transformers.llama import LlamaConfig
    from cave.transformers import llama_training as L

    result = {}
    peak = L.matmul_peak()
    result["bf16_matmul_peak_tflops"] = peak / 1e12
    print(f"bf16 matrix-product peak: {peak / 1e12:.2f} TFLOP/s")
    if not args.skip_train:
        p = L.PRESETS["quick"]
        config, mc = L.TrainConfig(**p["train"]), LlamaConfig(**p["model"])
        s = L.train(config, mc, stream=sys.stderr)
        tok_s = s["tokens"] / s["seconds"]
        fpt = L.flops_per_token(s["model"].config, config.block_size)
        result["quick"] = {
            "val_loss": s["val_loss"], "seconds": s["seconds"],
            "wall_seconds": s["wall_seconds"], "tokens": s["tokens"],
            "tokens_per_second": tok_s, "flops_per_token": fpt,
            "fraction_of_peak": tok_s * fpt / peak,
            "parameters": s["parameters"]}
        print(f"quick preset: val_loss {s['val_loss']:.4f} in "
              f"{s['wall_seconds']:.1f} s, {tok_s:,.0f} tok/s, "
              f"{tok_s * fpt / peak:.1%} of the peak")
    model, _, _ = L.load_model(L.SHIPPED)
    speeds = {"cache": L.generation_speed(model, 500, True),
              "no_cache": L.generation_speed(model, 500, False),
              "fast": FG.time_generation(lambda n: FG.fast_generate(
                  model, torch.zeros(1, 1, dtype=torch.long), n,
                  generator=torch.Generator().manual_seed(0)), 500)}
    result["generation_tokens_per_second"] = speeds
    print(f"generation, 500 tokens: {speeds['cache']:.0f} tok/s with the "
          f"KV cache, {speeds['no_cache']:.0f} without, {speeds['fast']:.0f}"
          f" with fast_generate (benchmarks/generation.py compares it with "
          f"Hugging Face)")
    if not args.no_record:
        record_results("llama_training", result, command(argv),
                       entry="bench")
    return 0


def find_chapter(name: str):
    """The chapter a stem (cnn) or part/stem (classical/cnn) names."""
    from cave import book

    known = book.chapters()
    name = name.removesuffix(".md").removeprefix("docs/")
    found = [c for c in known if name in (c.stem, str(c))]
    if len(found) != 1:
        raise UsageError(f"no chapter named {name!r}; expected one of "
                         f"{', '.join(c.stem for c in known)}")
    return found[0]


def chapters_with_full_run() -> list[str]:
    """The stems of the chapters whose module has a full_run."""
    from cave import book

    stems = []
    for chapter in book.chapters():
        try:
            module = importlib.import_module(chapter.module_name)
        except Exception:  # a chapter that does not import has none
            continue
        if hasattr(module, "full_run"):
            stems.append(chapter.stem)
    return stems


def cmd_run(args, argv: list[str]) -> int:
    chapter = find_chapter(args.chapter)
    if not args.full:
        if args.overrides or args.device or args.json:
            raise UsageError("key=value overrides, --device and --json "
                             "need --full")
        return run_page(chapter)
    overrides = dict(split_override(item) for item in args.overrides)
    overrides = {k: guess_value(v) for k, v in overrides.items()}
    device = checked_device(args.device)
    module = importlib.import_module(chapter.module_name)
    if not hasattr(module, "full_run"):
        have = chapters_with_full_run()
        raise UsageError(f"chapter {chapter.stem} has no full run; "
                         f"chapters with one: {', '.join(have) or 'none'}")
    parts = getattr(module, "FULL_RUN_PARTS", None)
    if parts is None:
        if "part" in overrides:
            raise UsageError(f"chapter {chapter.stem}'s full run has no "
                             f"parts; drop part={overrides['part']}")
        record = module.full_run(device=device, **overrides)
        path = record_results(chapter.stem, record, command(argv),
                              path=args.json)
        print(f"recorded {path}")
        return 0
    # A full run in parts: each part is one entry of the results file, so
    # re-running one part keeps the others.
    chosen = overrides.pop("part", None)
    if chosen is not None and chosen not in parts:
        raise UsageError(f"chapter {chapter.stem} has full-run parts "
                         f"{', '.join(parts)}; got part={chosen}")
    for part in [chosen] if chosen is not None else parts:
        record = module.full_run(device=device, part=part, **overrides)
        path = record_results(chapter.stem, record, command(argv),
                              entry=part, path=args.json)
        print(f"recorded part {part} in {path}")
    return 0


def run_page(chapter) -> int:
    """Run a chapter's fences top to bottom; print what each printed."""
    import time

    from cave import book

    run = book.ChapterRun(chapter.markdown)
    start = time.perf_counter()
    for index, fence in enumerate(run.fences):
        try:
            output = run.run_next()
        except Exception as err:
            raise RunFailed(f"docs/{chapter}.md line {fence.line}: "
                            f"{type(err).__name__}: {err}") from None
        print(f"--- fence {index + 1} (line {output.line}): "
              f"{output.seconds:.2f} s")
        if output.text:
            print(output.text, end="" if output.text.endswith("\n")
                  else "\n")
        for alt, _ in output.figures:
            print(f"[figure: {alt}]")
        sys.stdout.flush()
    book.save_outputs(run)
    print(f"--- {len(run.fences)} fences in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def command(argv: list[str]) -> str:
    return "cave " + " ".join(argv)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The `cave` command. Returns the exit status: 0 done, 1 a missing
    or damaged checkpoint or a failed chapter, 2 a bad command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "bench":
            return cmd_bench(args, argv)
        return cmd_run(args, argv)
    except SystemExit as exit:  # --help
        return exit.code if isinstance(exit.code, int) else 0
    except KeyboardInterrupt:
        print("cave: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("CAVE_TRACEBACK"):
            raise
        return report(err)


def report(err: Exception) -> int:
    """One line on stderr for an error; its exit status."""
    if isinstance(err, (CheckpointError, RunFailed)):
        status, text = BROKEN, str(err)
    elif isinstance(err, (UsageError, ValueError)):  # e.g. a prompt's
        status, text = USAGE, str(err)               # characters
    elif isinstance(err, OSError):
        status = BROKEN
        text = f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
    else:  # a bug: still one line, and how to see the traceback
        status = BROKEN
        text = (f"{type(err).__name__}: {err} (CAVE_TRACEBACK=1 shows "
                f"the traceback)")
    lines = text.strip().splitlines() or [type(err).__name__]
    print(f"cave: error: {lines[0]}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
