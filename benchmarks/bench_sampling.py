"""Tokens/s of `vqgan_jax.sampling.sample` vs the reference `sample_with_past`.

Both sample from the same randomly initialised minGPT (the reference model,
converted with `params_from_state_dict`), in one process, alternating runs
after a warm-up; the median of the timed runs is reported, and JAX's compile
time (first call) separately. Launch from the repository root:

  python -m benchmarks.bench_sampling                       # 12L d512 B16
  python -m benchmarks.bench_sampling --n_layer=4 --batch=4 --num_tokens=128

The reference's filter (transformers' `top_k_top_p_filtering`) only runs with
a numeric top_p when top_k is set, so it gets `top_p=1.0` (no-op filtering,
as in the reference's sampling scripts); ours gets `top_p=None`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

_TESTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tests")


def _reference():
  """Imports the reference minGPT through tests/oracle.py."""
  if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
  import oracle  # pylint: disable=import-outside-toplevel
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.transformer import mingpt  # pylint: disable=import-outside-toplevel
  return torch, mingpt


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n_layer", type=int, default=12)
  p.add_argument("--n_embd", type=int, default=512)
  p.add_argument("--n_head", type=int, default=8)
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--num_tokens", type=int, default=256)
  p.add_argument("--prefix_len", type=int, default=1)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--top_k", type=int, default=100)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--num_segments", type=int, default=None,
                 help="scan segments (default: the sampler's choice)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv=None) -> dict:
  args = parse_args(argv)
  torch, mingpt = _reference()
  torch.set_num_threads(args.threads)
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sampling  # pylint: disable=import-outside-toplevel

  block_size = args.prefix_len + args.num_tokens - 1
  config = dict(vocab_size=args.vocab_size, block_size=block_size,
                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
  torch.manual_seed(args.seed)
  ref = mingpt.GPT(**config).eval()
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = gpt_lib.GPT(**config)
  variables = {"params": gpt_lib.params_from_state_dict(state)}
  prefix = np.random.RandomState(args.seed).randint(
      0, args.vocab_size, (args.batch, args.prefix_len)).astype(np.int32)
  prefix_torch = torch.from_numpy(prefix.astype(np.int64))

  def run_ref():
    with torch.no_grad():
      return mingpt.sample_with_past(prefix_torch, ref, steps=args.num_tokens,
                                     top_k=args.top_k, top_p=1.0,
                                     sample_logits=True)

  rng = [jax.random.key(args.seed)]

  def run_ours():
    rng[0], key = jax.random.split(rng[0])
    out = sampling.sample(model, variables, prefix, args.num_tokens, key,
                          top_k=args.top_k, num_segments=args.num_segments)
    return jax.block_until_ready(out)

  compile_s, _ = _timed(run_ours)  # first call: trace + compile + run
  ours_warm, _ = _timed(run_ours)
  compile_s -= ours_warm
  _timed(run_ref)  # warm-up
  ref_times, our_times = [], []
  for _ in range(args.runs):
    ref_times.append(_timed(run_ref)[0])
    our_times.append(_timed(run_ours)[0])
  tokens = args.batch * args.num_tokens
  ref_s, our_s = statistics.median(ref_times), statistics.median(our_times)
  result = dict(ref_s=ref_s, ours_s=our_s, ref_tps=tokens / ref_s,
                ours_tps=tokens / our_s, speedup=ref_s / our_s,
                compile_s=compile_s)
  segments = args.num_segments or sampling.default_num_segments(
      args.num_tokens - 1)
  print(f"GPT {args.n_layer}L d{args.n_embd} h{args.n_head} "
        f"vocab {args.vocab_size}; batch {args.batch}, prefix "
        f"{args.prefix_len}, {args.num_tokens} tokens, top-k {args.top_k}; "
        f"{args.runs} runs (median), torch threads {args.threads}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{segments} scan segment(s)\n")
  print("| sampler | median s | tokens/s | speed-up |")
  print("|---|---|---|---|")
  print(f"| reference sample_with_past | {ref_s:.2f} | {tokens / ref_s:.0f} "
        "| 1.00x |")
  print(f"| vqgan_jax sample | {our_s:.2f} | {tokens / our_s:.0f} | "
        f"{ref_s / our_s:.2f}x |")
  print(f"\nJAX compile (first call minus a warm call): {compile_s:.2f} s")
  return result


if __name__ == "__main__":
  main()
