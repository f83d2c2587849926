"""DiT forward / train-step speed: kaleido_jax vs diffusers' WanTransformer3DModel, same machine, same run.

  python bench/dit_step.py [--layers 4] [--dim 512] [--heads 8] [--frames 5] [--size 32] [--refs 2]
  JAX_PLATFORMS=cuda python bench/dit_step.py --attention xla   # on a GPU: both sides on the GPU

Prints median (and min) times of a jitted forward and forward+backward (MSE on the output), all rows timed in
interleaved rounds, beside diffusers' PyTorch model (eager, and torch.compile when it works here) at an equal
token count: diffusers has no references, so it gets the reference latents as extra frames. Then compile time
at 4 vs 40 layers (scan), and a roofline: the step's FLOPs (analytic; XLA's cost analysis beside it) over this
machine's best measured fp32 matmul rate; then every matmul the step runs (backward and recomputation
included), each timed alone with XLA and as a PyTorch bmm: the PyTorch sum is what these matmuls cost with
PyTorch's kernels at their best layout (diffusers' linears use them; its fused attention blocks its own).
JAX runs on JAX_PLATFORMS (default cpu); the PyTorch model runs on the same kind of device (`--torch-device`,
default: cuda when JAX runs on a GPU), timed with a device synchronisation.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kaleido_jax import config as kcfg  # noqa: E402
from kaleido_jax.model.dit import KaleidoDiT  # noqa: E402


def _times(fn, repeats: int) -> list[float]:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def matmul_rate(n: int = 2048, repeats: int = 10) -> float:
  """The best of `repeats` timings of an n^3 fp32 matmul: what this machine can do, not its mood this minute."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / min(_times(lambda: f(a).block_until_ready(), repeats))


def build(args, layers: int, remat: str = "none", unroll: int = 1, scan: bool = True,
          cpu_kernels: str = "auto"):
  cfg = kcfg.model_config(num_heads=args.heads, head_dim=args.dim // args.heads, ffn_dim=4 * args.dim,
                          num_layers=layers, in_channels=16, out_channels=16, text_dim=args.text_dim,
                          remat_policy=remat, scan_unroll=unroll, scan_layers=scan,
                          attention=args.attention, cpu_kernels=cpu_kernels)
  return cfg, KaleidoDiT(cfg, rngs=nnx.Rngs(0))


def jax_fns(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, video, t, text, refs):
    return nnx.merge(graphdef, state)(video, t, text, refs=refs)

  @jax.jit
  def train_step(state, video, t, text, refs):
    def loss(s):
      return jnp.mean(nnx.merge(graphdef, s)(video, t, text, refs=refs) ** 2)
    return jax.value_and_grad(loss)(state)

  return state, forward, train_step


def compile_seconds(args, layers: int, inputs) -> float:
  _, model = build(args, layers)
  state, _, train_step = jax_fns(model)
  t0 = time.perf_counter()
  train_step.lower(state, *inputs).compile()
  return time.perf_counter() - t0


def time_matmuls(census, repeats: int, torch_device=None):
  """Each distinct matmul of `census` (flops.matmul_census) timed alone: rows (matmul, count, xla s, torch s).

  JAX gets the dot_general exactly as the step traces it (operand layouts included); PyTorch gets the same
  sizes as a contiguous (batch, m, k) x (batch, k, n) bmm, its best case. Each time is the min over
  `repeats` minus the framework's dispatch time of a 1x1 matmul, so that small matmuls are not mostly overhead.
  """
  rng = np.random.default_rng(0)

  def jax_time(lhs, rhs, dims):
    a = jnp.asarray(rng.standard_normal(lhs), jnp.float32)
    b = jnp.asarray(rng.standard_normal(rhs), jnp.float32)
    f = jax.jit(functools.partial(jax.lax.dot_general, dimension_numbers=dims,
                                  preferred_element_type=jnp.float32))
    return min(_times(lambda: f(a, b).block_until_ready(), repeats))

  jax_dispatch = jax_time((1, 1), (1, 1), (((1,), (0,)), ((), ())))
  torch_time = None
  if torch_device is not None:
    import torch
    sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)

    def torch_time(batch, m, n, k):
      a = torch.randn(batch, m, k, device=torch_device)
      b = torch.randn(batch, k, n, device=torch_device)
      return min(_times(lambda: (torch.bmm(a, b), sync()), repeats))

    torch_dispatch = torch_time(1, 1, 1, 1)
  rows = []
  for mm, count in census.items():
    xla = max(0.0, jax_time(mm.lhs, mm.rhs, mm.dimension_numbers) - jax_dispatch)
    pt = None if torch_time is None else max(0.0, torch_time(*mm.sizes) - torch_dispatch)
    rows.append((mm, count, xla, pt))
  return rows


def print_matmul_times(rows, roofline: float, best_step: float, top: int = 8) -> None:
  xla = sum(c * t for _, c, t, _ in rows)
  has_torch = rows[0][3] is not None
  pt = sum(c * t for _, c, _, t in rows) if has_torch else None
  print(f"\nmatmuls alone: the step's {sum(c for _, c, _, _ in rows)} matmuls ({len(rows)} distinct, "
        f"flops.matmul_census), each timed alone: XLA {xla * 1e3:.0f} ms = {xla / roofline:.2f}x the roofline"
        + (f"; PyTorch bmm at the same sizes {pt * 1e3:.0f} ms = {pt / roofline:.2f}x" if has_torch else "")
        + f". Fastest kaleido_jax step minus the XLA sum: {(best_step - xla) * 1e3:.0f} ms for everything else.")
  print("| matmul (batch, m, n, k) | count | GFLOP | XLA (ms, all) | XLA GFLOP/s |"
        + (" PyTorch (ms, all) | PyTorch GFLOP/s |" if has_torch else ""))
  print("|---|---|---|---|---|" + ("---|---|" if has_torch else ""))
  for mm, count, t_xla, t_pt in sorted(rows, key=lambda r: -r[1] * r[2])[:top]:
    gflop = mm.flops * count / 1e9
    rate = lambda t: f"{gflop / (count * t):.0f}" if t > 0 else "-"
    print(f"| {mm.sizes} | {count} | {gflop:.1f} | {count * t_xla * 1e3:.0f} | {rate(t_xla)} |"
          + (f" {count * t_pt * 1e3:.0f} | {rate(t_pt)} |" if has_torch else ""))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--frames", type=int, default=5)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--refs", type=int, default=2)
  p.add_argument("--text-len", type=int, default=64)
  p.add_argument("--text-dim", type=int, default=512)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--attention", default="xla", help="model.attention (xla | cudnn | splash)")
  p.add_argument("--torch-device", default=None, help="cpu | cuda; default: cuda when JAX runs on a GPU")
  args = p.parse_args()
  platform = jax.devices()[0].platform
  jax.config.update("jax_default_matmul_precision", "highest")

  rng = np.random.default_rng(0)
  b, f, s, c = 1, args.frames, args.size, 16
  video = rng.normal(size=(b, f, s, s, c)).astype(np.float32)
  refs = rng.normal(size=(b, args.refs, s, s, c)).astype(np.float32)
  text = rng.normal(size=(b, args.text_len, args.text_dim)).astype(np.float32)
  t = np.array([500.0], np.float32)
  inputs = tuple(jnp.asarray(x) for x in (video, t, text, refs))

  cfg, model = build(args, args.layers)
  state, forward, train_step = jax_fns(model)
  # (name, forward thunk, step thunk); all are timed in interleaved rounds (below).
  candidates = [("kaleido_jax (jit)", lambda: forward(state, *inputs).block_until_ready(),
                 lambda: jax.block_until_ready(train_step(state, *inputs)))]
  # Saving only the matmul outputs (model.remat_policy) also skips storing the per-layer elementwise residuals,
  # which XLA:CPU zero-fills and copies into the scan's stacked buffers; dots_no_batch re-runs attention's
  # forward in the backward, dots_and_attention keeps the attention kernel's output and log-sum-exp instead.
  # model.scan_unroll = layers: straight-line code over the same stacked weights, no while loop to stack
  # residuals into; model.scan_layers = False: one weight array per layer, none sliced out of a stack.
  # model.cpu_kernels = off: the plain program TPUs and GPUs run, without model/cpu.py's rewrites.
  for policy, unrolled, scan, ck in (("dots_no_batch", False, True, "auto"),
                                     ("dots_and_attention", False, True, "auto"), ("none", True, True, "auto"),
                                     ("dots_and_attention", True, True, "auto"),
                                     ("dots_and_attention", False, False, "auto"), ("none", False, True, "off"),
                                     ("dots_and_attention", False, True, "off")):
    _, remat_model = build(args, args.layers, policy, args.layers if unrolled else 1, scan, ck)
    r_state, r_forward, r_step = jax_fns(remat_model)
    name = ", ".join(([] if policy == "none" else [f"remat {policy}"]) + (["layers unrolled"] if unrolled else [])
                     + ([] if scan else ["layers as a list"]) + ([] if ck == "auto" else [f"cpu_kernels={ck}"]))
    candidates.append((f"kaleido_jax (jit, {name})",
                       functools.partial(lambda f, st: f(st, *inputs).block_until_ready(), r_forward, r_state),
                       functools.partial(lambda f, st: jax.block_until_ready(f(st, *inputs)), r_step, r_state)))

  if not args.no_torch:
    import torch
    from diffusers import WanTransformer3DModel
    dev = torch.device(args.torch_device or ("cuda" if platform == "gpu" else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    tm = WanTransformer3DModel(num_attention_heads=args.heads, attention_head_dim=args.dim // args.heads,
                               in_channels=c, out_channels=c, text_dim=args.text_dim, ffn_dim=4 * args.dim,
                               num_layers=args.layers, rope_max_seq_len=1024).to(dev)
    # Equal token count: the references ride along as extra latent frames.
    tv = torch.from_numpy(np.concatenate([refs, video], 1).transpose(0, 4, 1, 2, 3).copy()).to(dev)
    tt, ttext = torch.from_numpy(t).to(dev), torch.from_numpy(text).to(dev)

    def torch_fwd(m):
      with torch.no_grad():
        out = m(tv, tt, ttext, return_dict=False)[0]
      sync()
      return out

    def torch_step(m):
      m.zero_grad(set_to_none=True)
      out = m(tv, tt, ttext, return_dict=False)[0]
      (out ** 2).mean().backward()
      sync()

    candidates.append(("diffusers eager", lambda: torch_fwd(tm), lambda: torch_step(tm)))
    try:
      cm = torch.compile(tm)
      torch_step(cm)  # compiles here, so that a failure is caught
      candidates.append(("diffusers torch.compile", lambda: torch_fwd(cm), lambda: torch_step(cm)))
    except Exception as e:  # torch.compile needs a working C++ toolchain / inductor
      print(f"torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

  # Interleaved rounds: every candidate once per round, so that load drifting on a shared machine hits all
  # rows alike; min and median over the rounds.
  times = {name: ([], []) for name, _, _ in candidates}
  for _, fw, st in candidates:
    fw(), st()  # compile / warm up
  for _ in range(args.repeats):
    for name, fw, st in candidates:
      for fn, out in zip((fw, st), times[name]):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
  rows = [(name, statistics.median(fws), statistics.median(sts), min(sts)) for name, (fws, sts) in times.items()]
  step = rows[0][2]

  tokens = (f + args.refs) * (s // 2) ** 2
  print(f"\nDiT dim {args.dim}, {args.heads} heads, {args.layers} layers, {f} frames x {s}x{s} latents + "
        f"{args.refs} refs = {tokens} tokens, text {args.text_len}, batch 1, fp32, attention {args.attention}, "
        f"{jax.device_count()} JAX {platform} device(s) ({jax.devices()[0].device_kind}), {os.cpu_count()} cores"
        + ("" if args.no_torch else f", PyTorch on {dev.type}"))
  print(f"median (min) of {args.repeats} interleaved rounds")
  print(f"| implementation | forward (ms) | fwd+bwd step (ms) | step speed-up vs diffusers eager |")
  print("|---|---|---|---|")
  eager = next((r for r in rows if r[0] == "diffusers eager"), None)
  for name, fw, st, st_min in rows:
    ratio = f"{eager[2] / st:.2f}x ({eager[3] / st_min:.2f}x)" if eager else "-"
    print(f"| {name} | {fw * 1e3:.1f} | {st * 1e3:.1f} ({st_min * 1e3:.1f}) | {ratio} |")

  from kaleido_jax.train import flops as flops_lib
  # XLA's cost analysis counts a scanned layer once, so the roofline uses the analytic count
  # (kaleido_jax/train/flops.py states the formula); XLA's number is printed beside it.
  v_tok, r_tok = flops_lib.tokens((f, s, s), args.refs, (s, s), cfg.patch_size)
  analytic = flops_lib.train_step_flops(cfg, b, v_tok, r_tok, args.text_len)
  cost = train_step.lower(state, *inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  rate = matmul_rate()
  roofline = analytic / rate
  best = min(st for name, _, st, _ in rows if name.startswith("kaleido_jax"))
  print(f"\nroofline: step {analytic / 1e9:.1f} GFLOP analytic (XLA cost analysis, one scanned layer: "
        f"{xla_flops / 1e9:.1f}) / best measured fp32 matmul rate {rate / 1e9:.1f} GFLOP/s = {roofline * 1e3:.0f} ms; "
        f"our step is {step / roofline:.2f}x the roofline (fastest kaleido_jax row: {best / roofline:.2f}x)")

  census = flops_lib.matmul_census(train_step, state, *inputs)
  matmuls = time_matmuls(census, args.repeats, None if args.no_torch else dev)
  print_matmul_times(matmuls, roofline, best)

  c4 = compile_seconds(args, 4, inputs)
  c40 = compile_seconds(args, 40, inputs)
  print(f"compile time (train step, scan): 4 layers {c4:.2f} s, 40 layers {c40:.2f} s, ratio {c40 / c4:.2f}")


if __name__ == "__main__":
  main()
