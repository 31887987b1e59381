"""Rows, device peaks, XLA cost/memory analysis and the printed table."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from vqgan_jax.backends import device_memory
from vqgan_jax.training.transformer_trainer import PEAK_TFLOPS

# Device peaks: the bfloat16 dense TFLOP/s are the trainer's table
# (`PEAK_TFLOPS`, which its MFU logs use). float32 "as used": XLA's default
# matmul/conv precision on NVIDIA tensor-core GPUs runs float32 as TF32, at
# half the bfloat16 rate (non-tensor FP32 is far lower: 67 TFLOP/s on the
# H100/H200, 19.5 on the A100); on TPUs float32 matmuls run as bfloat16
# passes, at the bfloat16 rate. HBM bandwidth in TB/s, from the NVIDIA
# H100/H200/A100 datasheets (SXM) and the Cloud TPU pages; approximate.
HBM_TB_PER_S = {
    "h200": 4.8, "h100": 3.35, "a100": 2.04, "l4": 0.3,
    "tpu v5 lite": 0.82, "tpu v5e": 0.82, "tpu v4": 1.2,
}


@dataclasses.dataclass
class Row:
  """One measured implementation in one benchmark."""
  bench: str            # e.g. 'stage-1 training'
  impl: str             # 'vqgan-jax' | 'reference'
  precision: str        # 'float32' | 'bfloat16' | 'autocast bf16'
  unit: str             # 'images/s' | 'tokens/s'
  items: float          # images or tokens per call
  times: List[float]    # seconds per timed call
  compile_s: Optional[float] = None
  peak_bytes: Optional[float] = None
  peak_source: str = ""
  flops: Optional[float] = None  # per call
  peak_tflops: Optional[float] = None

  @property
  def median_s(self) -> float:
    ts = sorted(self.times)
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])

  @property
  def rate(self) -> float:
    return self.items / self.median_s

  @property
  def tflops_per_s(self) -> Optional[float]:
    return self.flops / self.median_s / 1e12 if self.flops else None

  @property
  def mfu(self) -> Optional[float]:
    t = self.tflops_per_s
    return t / self.peak_tflops if t and self.peak_tflops else None


def device_kind() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform}:{dev.device_kind}"


def peaks(kind: Optional[str] = None):
  """(bf16, f32) TFLOP/s and TB/s of this device, or Nones when unknown."""
  kind = (kind or jax.devices()[0].device_kind).lower()
  for name, bf16 in PEAK_TFLOPS.items():
    if name in kind:
      f32 = bf16 if name.startswith("tpu") else bf16 / 2
      tbs = next((v for k, v in HBM_TB_PER_S.items() if k in kind), None)
      return bf16, f32, tbs
  return None, None, None


def peak_for(precision: str, kind: Optional[str] = None,
             cpu_peak: Optional[float] = None) -> Optional[float]:
  bf16, f32, _ = peaks(kind)
  if bf16 is None:
    return cpu_peak
  return bf16 if "bf16" in precision or "bfloat16" in precision else f32


def measure_cpu_matmul_tflops(n: int = 1024, repeats: int = 5,
                              min_seconds: float = 1.0) -> float:
  """Best float32 matmul rate of this host through XLA (TFLOP/s).

  Not a datasheet peak: the practical ceiling the MFU on CPU is taken
  against (stated as such in the table). The best of at least `repeats`
  products over at least `min_seconds`: a start-up measurement over a few
  10 ms products once caught a moment when the second core was busy and
  read half the rate (0.103-0.112 against 0.20-0.21 TFLOP/s on the same
  machine), which put the table's MFU over 100%.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  start = time.perf_counter()
  done = 0
  while done < repeats or time.perf_counter() - start < min_seconds:
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
    done += 1
  return 2 * n ** 3 / best / 1e12


def xla_flops(compiled) -> Optional[float]:
  """FLOPs of one call from XLA's cost analysis (None when unavailable).

  Custom calls (cuDNN attention) are not counted by XLA, so on GPU this is
  a lower bound.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  return float(cost.get("flops", 0.0)) or None


def xla_memory(compiled) -> Optional[float]:
  """Bytes XLA plans for one call: arguments + outputs - aliased + temps
  (the trainers' start-up estimate)."""
  total = device_memory.compiled_bytes(compiled)
  return float(total) if total else None


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _fmt(x: Optional[float], spec: str, none: str = "n/a") -> str:
  return none if x is None else format(x, spec)


def _mem(row: Row) -> str:
  if row.peak_bytes is None:
    return "n/a"
  if row.peak_bytes < 2 ** 30:
    return f"{row.peak_bytes / 2 ** 20:.1f} MiB ({row.peak_source})"
  return f"{row.peak_bytes / 2 ** 30:.2f} GiB ({row.peak_source})"


def format_rows(rows: Sequence[Row]) -> str:
  """Markdown table; ratios against each benchmark's reference float32."""
  head = ("| benchmark | implementation | precision | median s/call | rate | "
          "vs ref f32 | compile s | peak memory | GFLOP/call | TFLOP/s | MFU |")
  out = [head, "|" + "---|" * 11]
  base = {r.bench: r.median_s for r in rows
          if r.impl == "reference" and r.precision == "float32"}
  for r in rows:
    ratio = (f"{base[r.bench] / r.median_s:.2f}x" if r.bench in base
             else "n/a")
    mfu = r.mfu
    out.append(
        f"| {r.bench} | {r.impl} | {r.precision} | {r.median_s:.4g} | "
        f"{r.rate:.4g} {r.unit} | {ratio} | {_fmt(r.compile_s, '.1f', '-')} | "
        f"{_mem(r)} | {_fmt(r.flops and r.flops / 1e9, '.4g')} | "
        f"{_fmt(r.tflops_per_s, '.3g')} | "
        f"{_fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} |")
  return "\n".join(out)


def to_json(rows: Sequence[Row], notes: Sequence[str], meta: Dict) -> str:
  return json.dumps({"meta": meta, "notes": list(notes),
                     "rows": [dataclasses.asdict(r) for r in rows]})


def from_json(text: str):
  d = json.loads(text)
  return [Row(**r) for r in d["rows"]], d["notes"], d["meta"]
