"""docs/frontiers/fast_generation.md against its references.

The references: the LLaMA chapter's model, generate and beam_search;
window_forward (a full forward with a sliding-window mask) past the
window; transformers' LlamaForCausalLM.generate(do_sample=False) inside
it. Token-for-token comparisons run in float64 (no near-ties decided by
rounding) except against transformers (float32, eager attention); logits
are compared at rtol=atol=1e-5 in float32, 2**-6 in bfloat16 (8
significant bits) and 2**-9 in float16 (11). Speculative sampling is checked statistically: a
chi-squared test of the joint distribution of two sampled tokens against
the target's exact probabilities, with a fixed seed (so it cannot flake)
and a threshold at the 0.1 % tail. No test times anything.
"""

import json
import math
import random
from collections import Counter

import pytest
import torch

from cave import cli
from cave.frontiers import fast_generation as FG
from cave.transformers import llama as L

import transformers  # noqa: E402  (a test requirement: never skip)

F32 = {"rtol": 1e-5, "atol": 1e-5}
BF16 = {"rtol": 2 ** -6, "atol": 2 ** -6}
F16 = {"rtol": 2 ** -9, "atol": 2 ** -9}  # 11 significant bits

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [  # (vocab, dim, layers, heads, kv heads, window)
    (23, 32, 2, 4, 2, 8),
    (17, 24, 1, 3, 3, 5),
    (29, 32, 2, 4, 1, 12),
]


def model(vocab, dim, layers, heads, kv, window, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = L.Llama(L.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers,
                              n_heads=heads, n_kv_heads=kv,
                              max_seq_len=window))
    with torch.no_grad():  # random norm gains: a swapped norm is caught
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return m.to(dtype).eval()


def ids(B, T, V, seed=0):
    return torch.randint(0, V, (B, T),
                         generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# the reference and the rolling cache
# --------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_window_forward_is_the_model_when_the_window_covers_the_text(
        config):
    m = model(*config)
    x = ids(2, config[-1], config[0])
    with torch.no_grad():
        torch.testing.assert_close(FG.window_forward(m, x), m(x)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prompt_len", [1, 3, 20])  # 20: past the window
def test_rolling_generation_equals_window_forward_past_the_window(
        config, prompt_len):
    m = model(*config)
    out = FG.fast_generate(m, ids(2, prompt_len, config[0]), 30,
                           temperature=0)  # (2, prompt_len + 30)
    logits = FG.window_forward(m, out)
    assert torch.equal(logits[:, prompt_len - 1:-1].argmax(-1),
                       out[:, prompt_len:])
    # the decoder's own logits, step by step, equal the reference's
    decoder = FG.FastDecoder(m)
    cache = decoder.new_cache(2)
    steps = [decoder(out[:, :prompt_len], cache)]
    steps += [decoder(out[:, i:i + 1], cache)
              for i in range(prompt_len, out.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("capacity_extra, chunk", [(0, 1), (3, 4), (6, 3)])
def test_chunks_in_a_larger_ring_equal_window_forward(capacity_extra, chunk):
    m = model(*CONFIGS[0])
    x = ids(1, 40, 23, seed=4)
    decoder = FG.FastDecoder(m)
    cache = decoder.new_cache(1, 8 + capacity_extra)
    got = torch.cat([decoder(x[:, i:i + chunk], cache)
                     for i in range(0, 40, chunk)], 1)
    torch.testing.assert_close(got, FG.window_forward(m, x), rtol=1e-10,
                               atol=1e-10)


def test_rollback_then_continue_equals_window_forward():
    m = model(*CONFIGS[0])
    x, wrong = ids(1, 30, 23, seed=5), ids(1, 30, 23, seed=6)
    decoder = FG.FastDecoder(m)
    cache = decoder.new_cache(1, 8 + 4)
    decoder(x[:, :20], cache)
    decoder(wrong[:, :4], cache)  # four tokens, then taken back
    cache.rollback(20)
    got = decoder(x[:, 20:], cache)
    torch.testing.assert_close(got, FG.window_forward(m, x)[:, 20:],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("switch", [
    {}, {"fused": False}, {"rope_table": False}, {"transposed": False},
    {"transposed": True}, {"attention": "sdpa"}])
def test_every_switch_samples_what_generate_samples(switch):
    m = model(*CONFIGS[2])
    prompt = ids(3, 4, 29, seed=1)
    want = L.generate(m, prompt, 8, top_k=10, top_p=0.9,
                      generator=torch.Generator().manual_seed(2))
    got = FG.fast_generate(FG.FastDecoder(m, **switch), prompt, 8, top_k=10,
                           top_p=0.9,
                           generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


def test_without_the_cache_the_same_tokens():
    m = model(*CONFIGS[0])
    prompt = ids(2, 3, 23, seed=3)
    runs = [FG.fast_generate(m, prompt, 25, temperature=0.8,
                             generator=torch.Generator().manual_seed(0),
                             use_cache=use) for use in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32),
                                        (torch.bfloat16, BF16),
                                        (torch.float16, F16)])
def test_logits_match_the_model_in_float32_bfloat16_and_float16(dtype, tol):
    m = model(*CONFIGS[0], dtype=torch.float32)
    x = ids(2, 8, 23, seed=7)
    decoder = FG.FastDecoder(m, dtype)
    cache = decoder.new_cache(2)
    got = torch.cat([decoder(x[:, :3], cache)]
                    + [decoder(x[:, i:i + 1], cache) for i in range(3, 8)], 1)
    with torch.no_grad():  # float16 against the float32 model
        want = m.to(dtype if dtype != torch.float16 else torch.float32)(x)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32),
                                        (torch.bfloat16, BF16)])
def test_int8_weights_are_the_compression_chapters_int8_model(dtype, tol):
    from cave.techniques.compression import quantize_llama

    m = model(*CONFIGS[0], dtype=torch.float32)
    quantised, _ = quantize_llama(m, bits=8, group_size=None)  # per channel
    x = ids(2, 8, 23, seed=8)
    decoder = FG.FastDecoder(m, dtype, int8=True)
    assert decoder.layers[0][2][0].dtype == torch.int8  # one byte a weight
    cache = decoder.new_cache(2)
    got = torch.cat([decoder(x[:, :3], cache)]
                    + [decoder(x[:, i:i + 1], cache) for i in range(3, 8)], 1)
    with torch.no_grad():
        want = quantised.to(dtype)(x)[0]
    torch.testing.assert_close(got.float(), want.float(), **tol)
    unrounded = FG.FastDecoder(m, dtype)
    plain = unrounded(x, unrounded.new_cache(2))
    assert not torch.equal(plain, got)  # the rounding is really there


# --------------------------------------------------------------------------
# against transformers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_equals_transformers_generate_inside_the_window(config):
    m = model(*config, dtype=torch.float32, seed=11)
    state, hf_config = L.export_hf(m)
    hf_config = transformers.LlamaConfig(**json.loads(json.dumps(hf_config)))
    hf_config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    ref.load_state_dict(state, strict=True)
    prompt = ids(2, 2, config[0], seed=12)
    n = config[-1] - 2  # the whole window
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(FG.fast_generate(m, prompt, n, temperature=0), want)


# --------------------------------------------------------------------------
# batches: per-row stopping, beam search
# --------------------------------------------------------------------------


def test_each_row_stops_at_its_end_token_and_equals_its_run_alone():
    m = model(*CONFIGS[1])
    prompts = ids(4, 3, 17, seed=8)
    alone = [FG.fast_generate(m, prompts[b:b + 1], 20, temperature=0)[0]
             for b in range(4)]
    eos = int(alone[0][5])  # a token row 0 emits: it must stop there
    batch = FG.fast_generate(m, prompts, 20, temperature=0, eos_id=eos)
    for b in range(4):
        new = alone[b][3:]
        hits = (new == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(new)
        assert torch.equal(batch[b, 3:3 + end], new[:end])
        assert (batch[b, 3 + end:] == eos).all()  # padded after its end
    assert batch.shape[1] < 3 + 20 or any(
        not (a[3:] == eos).any() for a in alone)


@pytest.mark.parametrize("eos, penalty", [(None, 1.0), (0, 1.0), (2, 0.5)])
def test_beam_search_batch_equals_beam_search_prompt_by_prompt(eos,
                                                                penalty):
    m = model(11, 32, 2, 4, 2, 32, seed=2)
    prompts = ids(3, 4, 11, seed=9)
    batch = FG.beam_search_batch(m, prompts, 10, beam_width=3, eos_id=eos,
                                 length_penalty=penalty)
    for b, (tokens, score) in enumerate(batch):
        want, want_score = L.beam_search(m, prompts[b:b + 1], 10,
                                         beam_width=3, eos_id=eos,
                                         length_penalty=penalty)
        assert torch.equal(tokens, want[0])
        assert score == pytest.approx(want_score, rel=1e-12)


# --------------------------------------------------------------------------
# speculative decoding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_speculative_is_the_targets_greedy_output(draft_tokens):
    target = model(*CONFIGS[0], seed=1)
    draft = model(23, 16, 1, 2, 1, 6, seed=2)
    prompt = ids(1, 3, 23, seed=10)
    got, stats = FG.speculative_generate(target, draft, prompt, 40,
                                         draft_tokens, temperature=0)
    want = FG.fast_generate(target, prompt, 40, temperature=0)
    assert torch.equal(got, want)  # 43 tokens: well past the window of 8
    assert stats["rounds"] + stats["accepted"] == 40


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 2)])
def test_speculative_samples_follow_the_targets_distribution(temperature,
                                                             top_k):
    V, runs = 3, 600
    target = model(V, 16, 1, 2, 1, 8, seed=3)
    draft = model(V, 8, 1, 2, 1, 4, seed=4)
    fast_target, fast_draft = FG.FastDecoder(target), FG.FastDecoder(draft)
    prompt = torch.tensor([[0, 1]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    for _ in range(runs):
        out, _ = FG.speculative_generate(fast_target, fast_draft, prompt,
                                         2, 2,
                                         temperature=temperature,
                                         top_k=top_k, generator=gen)
        counts[out[0, 2], out[0, 3]] += 1
    with torch.no_grad():  # the exact joint distribution of two tokens
        first = FG.sampling_probs(target(prompt)[0][0, -1], temperature,
                                  top_k)  # (V,)
        pairs = torch.cat([prompt.expand(V, 2), torch.arange(V)[:, None]],
                          1)  # (V, 3)
        second = FG.sampling_probs(target(pairs)[0][:, -1], temperature,
                                   top_k)  # (V, V)
    expected = runs * first[:, None] * second  # (V, V)
    zero = expected == 0
    assert counts[zero].sum() == 0  # never a token top-k removed
    chi2 = ((counts - expected)[~zero] ** 2 / expected[~zero]).sum()
    cells = int((~zero).sum())
    # 0.1 % tail of chi-squared with cells - 1 degrees of freedom
    # (8 for 9 cells: 26.1; 3 for 4 cells: 16.3)
    limit = {9: 26.1, 4: 16.3}[cells]
    assert chi2 < limit, (chi2, counts, expected)


def test_accept_drafts_keeps_everything_when_draft_and_target_agree():
    p = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    drafts = torch.tensor([1, 4, 2])
    out = FG.accept_drafts(p, p[:3], drafts,
                           torch.Generator().manual_seed(0))
    assert torch.equal(out[:3], drafts) and out.shape == (4,)
    greedy = FG.accept_drafts(p, p[:3], p[:3].argmax(-1), greedy=True)
    assert torch.equal(greedy, p.argmax(-1))


# --------------------------------------------------------------------------
# the n-gram draft
# --------------------------------------------------------------------------


def counted_by_hand(text, context, order, min_count):
    """The next-token counts NGramDraft should use, with collections."""
    for n in range(min(order, len(context) + 1), 0, -1):
        ctx = tuple(context[len(context) - n + 1:])
        seen = Counter(text[i + n - 1] for i in range(len(text) - n + 1)
                       if tuple(text[i:i + n - 1]) == ctx)
        if n == 1 or sum(seen.values()) >= min_count:
            return seen


@pytest.mark.parametrize("V, order, min_count", [(5, 1, 1), (5, 3, 1),
                                                 (4, 4, 2), (7, 3, 5)])
def test_ngram_counts_equal_counting_by_hand(V, order, min_count):
    rng = random.Random(V * 100 + order * 10 + min_count)
    text = [rng.randrange(V) for _ in range(300)]
    draft = FG.NGramDraft(torch.tensor(text), FG.NGramConfig(V, order,
                                                             min_count))
    for _ in range(40):
        context = [rng.randrange(V) for _ in range(rng.randrange(1, 7))]
        want = torch.full((V,), float("-inf"))
        for token, k in counted_by_hand(text, context, order,
                                        min_count).items():
            want[token] = math.log(k)
        got = draft.next_logits(context)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    state = draft.new_cache()  # called like a decoder: every position
    ids = torch.tensor([text[:5]])
    logits = draft(ids, state)  # (1, 5, V)
    assert logits.shape == (1, 5, V) and state.length == 5
    for i in range(5):
        assert torch.equal(logits[0, i], draft.next_logits(text[:i + 1]))
    state.rollback(2)
    assert state.tokens == text[:2]


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_greedy_speculative_with_counts_is_the_targets_greedy_output(
        draft_tokens):
    target = model(*CONFIGS[0], seed=1)
    prompt = ids(1, 3, 23, seed=10)
    want = FG.fast_generate(target, prompt, 40, temperature=0)
    # counts of the target's own text (accepting often) and of noise
    for text in (want[0, 3:], ids(1, 200, 23, seed=11)[0]):
        draft = FG.NGramDraft(text, FG.NGramConfig(23, 3, 1))
        got, stats = FG.speculative_generate(target, draft, prompt, 40,
                                             draft_tokens, temperature=0)
        assert torch.equal(got, want)  # 43 tokens: past the window of 8
        assert stats["rounds"] + stats["accepted"] == 40


def test_speculative_with_counts_samples_the_targets_distribution():
    V, runs, temperature = 3, 600, 0.9
    target = model(V, 16, 1, 2, 1, 8, seed=3)
    draft = FG.NGramDraft(ids(1, 40, V, seed=5)[0], FG.NGramConfig(V, 2, 1))
    fast_target = FG.FastDecoder(target)
    prompt = torch.tensor([[0, 1]])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V, V)
    for _ in range(runs):
        out, _ = FG.speculative_generate(fast_target, draft, prompt, 2, 2,
                                         temperature=temperature,
                                         generator=gen)
        counts[out[0, 2], out[0, 3]] += 1
    with torch.no_grad():
        first = FG.sampling_probs(target(prompt)[0][0, -1], temperature)
        pairs = torch.cat([prompt.expand(V, 2), torch.arange(V)[:, None]],
                          1)  # (V, 3)
        second = FG.sampling_probs(target(pairs)[0][:, -1], temperature)
    expected = runs * first[:, None] * second  # (V, V), no zero cell
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 26.1, (chi2, counts, expected)  # 0.1 % tail, 8 d.o.f.


def test_the_shakespeare_draft_counts_the_training_split_only():
    from cave.fundamentals.data import shakespeare_split
    from cave.transformers.llama_training import SHIPPED, load_model

    _, tokenizer, _ = load_model(SHIPPED)
    chars, train, _ = shakespeare_split()
    draft = FG.shakespeare_draft(tokenizer, order=3)
    assert int(draft.counts[0].sum()) == len(train)  # every character once
    assert int(draft.counts[2].sum()) == len(train) - 2


# --------------------------------------------------------------------------
# errors and the command line
# --------------------------------------------------------------------------


def test_errors_name_what_was_expected():
    m = model(*CONFIGS[0])
    with pytest.raises(ValueError, match=r"capacity must be at least the "
                                         r"window 8, got 5"):
        FG.FastDecoder(m).new_cache(1, 5)
    decoder = FG.FastDecoder(m)
    cache = decoder.new_cache(1, 10)
    decoder(ids(1, 12, 23), cache)
    with pytest.raises(ValueError, match=r"at most 2 tokens, asked for 3"):
        cache.rollback(9)
    with pytest.raises(ValueError, match=r"rollback to a length in 0..12, "
                                         r"got 13"):
        cache.rollback(13)
    with pytest.raises(ValueError, match=r"shape \(B, T\) with T >= 1, "
                                         r"dtype torch.int64, got \(3,\)"):
        FG.fast_generate(m, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"one prompt of shape \(1, T\), "
                                         r"got \(2, 3\)"):
        FG.speculative_generate(m, m, ids(2, 3, 23), 2)
    with pytest.raises(ValueError, match=r"vocabulary must be the target's "
                                         r"23 tokens, got 17"):
        FG.speculative_generate(m, model(*CONFIGS[1]), ids(1, 3, 23), 2)
    with pytest.raises(ValueError, match=r"'matmul' or 'sdpa', got 'flash'"):
        FG.FastDecoder(m, attention="flash")
    with pytest.raises(ValueError, match=r"recomputes a Llama's forward, "
                                         r"got a FastDecoder"):
        FG.fast_generate(decoder, ids(1, 2, 23), 2, use_cache=False)
    with pytest.raises(ValueError, match=r"vocab_size, order and min_count "
                                         r">= 1, got 5, 0 and 1"):
        FG.NGramConfig(5, 0, 1)
    with pytest.raises(ValueError, match=r"does not fit one int64 key"):
        FG.NGramConfig(65, 12)
    with pytest.raises(ValueError, match=r"shape \(N,\), N >= order 3, "
                                         r"dtype torch.int64, got \(1, 4\)"):
        FG.NGramDraft(ids(1, 4, 5), FG.NGramConfig(5, 3))
    with pytest.raises(ValueError, match=r"token ids in 0..4, got 0..8"):
        FG.NGramDraft(torch.arange(9), FG.NGramConfig(5, 3))
    counts = FG.NGramDraft(torch.arange(5), FG.NGramConfig(5, 2))
    with pytest.raises(ValueError, match=r"one prompt, got batch_size 2"):
        counts.new_cache(2)
    state = counts.new_cache()
    counts(torch.tensor([[1, 2]]), state)
    with pytest.raises(ValueError, match=r"length in 0..2, got 3"):
        state.rollback(3)
    with pytest.raises(ValueError, match=r"vocabulary must be the target's "
                                         r"23 tokens, got 5"):
        FG.speculative_generate(m, counts, ids(1, 3, 23), 2)
    other = type("Tokenizer", (), {"chars": "abc"})()
    with pytest.raises(ValueError, match=r"counts Shakespeare's 65 "
                                         r"characters; the model reads 3"):
        FG.shakespeare_draft(other)


def test_cave_sample_drafts_with_counts_then_without(capsys):
    from cave.transformers.llama_training import SHIPPED, load_model

    assert cli.main(["sample", "--tokens", "30", "--seed", "4",
                     "--top-k", "5", "--time"]) == 0
    out = capsys.readouterr()
    assert "generated 30 tokens in" in out.err
    assert "building the n-gram draft took" in out.err
    model, tokenizer, _ = load_model(SHIPPED)
    prompt = tokenizer.encode("\n")[None]
    # the shipped weights are bfloat16 numbers: by default it computes so
    assert cli.stored_dtype(model) == torch.bfloat16
    bf16 = FG.FastDecoder(model, torch.bfloat16)
    want, _ = FG.speculative_generate(
        bf16, FG.shakespeare_draft(tokenizer), prompt, 30,
        FG.NGRAM_DRAFT_TOKENS, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(4))
    assert out.out == tokenizer.decode(want[0]) + "\n"
    assert cli.main(["sample", "--tokens", "30", "--seed", "4",
                     "--top-k", "5", "--draft", "none"]) == 0
    want = FG.fast_generate(bf16, prompt, 30, temperature=0.8, top_k=5,
                            generator=torch.Generator().manual_seed(4))
    assert capsys.readouterr().out == tokenizer.decode(want[0]) + "\n"
    assert cli.main(["sample", "--tokens", "30", "--seed", "4",
                     "--top-k", "5", "--draft", "none",
                     "--dtype", "float32"]) == 0
    want = FG.fast_generate(model, prompt, 30, temperature=0.8, top_k=5,
                            generator=torch.Generator().manual_seed(4))
    assert capsys.readouterr().out == tokenizer.decode(want[0]) + "\n"
    with torch.no_grad():  # one weight off bfloat16's grid: float32
        model.output.weight[0, 0] += 2 ** -20
    assert cli.stored_dtype(model) == torch.float32


def test_the_shipped_draft_shares_the_shipped_models_characters():
    from cave.transformers.llama_training import SHIPPED, load_model

    _, big, _ = load_model(SHIPPED)
    draft, small, _ = load_model(FG.DRAFT)
    assert small.chars == big.chars
    assert draft.config.vocab_size == len(big.chars)


def test_cave_sample_in_float16_and_what_it_refuses(capsys):
    from cave.transformers.llama_training import SHIPPED, load_model

    assert cli.main(["sample", "--tokens", "20", "--seed", "1",
                     "--dtype", "float16", "--draft", "none"]) == 0
    model, tokenizer, _ = load_model(SHIPPED)
    want = FG.fast_generate(FG.FastDecoder(model, torch.float16),
                            tokenizer.encode("\n")[None], 20,
                            temperature=0.8,
                            generator=torch.Generator().manual_seed(1))
    assert capsys.readouterr().out == tokenizer.decode(want[0]) + "\n"
    assert cli.main(["sample", "--no-cache", "--dtype", "float16"]) == 2
    assert "--no-cache runs the float32 model" in capsys.readouterr().err
    assert cli.main(["sample", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
