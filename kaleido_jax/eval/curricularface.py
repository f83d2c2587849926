"""The CurricularFace IR-101 face-embedding network of OpenS2V-Eval's FaceSim-Cur, in Flax NNX, loading the
benchmark's `glint360k_curricular_face_r101_backbone.bin` (a PyTorch state dict) as it is.

Architecture facts (TFace's `model_irse.Backbone`, which the benchmark's `utils/curricularface` adopts): a 3x3 conv
(3 -> 64) + BatchNorm + PReLU; IR units in four stages of [3, 13, 30, 3] (IR-101; [2, 2, 2, 2] IR-18, [3, 4, 6, 3]
IR-34, [3, 4, 14, 3] IR-50) with depths 64, 128, 256, 512, the first unit of each stage striding 2; a unit is
BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (the stride) -> BN, plus a shortcut: the input subsampled (MaxPool2d(1,
stride)) when the depth is unchanged, else a strided 1x1 conv + BN; the head: BN2d -> Dropout -> flatten (NCHW
order) -> Linear(512 x 7 x 7, 512) -> BatchNorm1d(512, affine=False). Input 112 x 112 RGB in [-1, 1]; BatchNorm at
inference (running statistics, eps 1e-5). The benchmark L2-normalises the output before the cosine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaleido_jax.convert import common

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
DEPTHS = (64, 128, 256, 512)
EPS = 1e-5


class BatchNorm(nnx.Module):
  """Inference-mode BatchNorm over the last axis: running mean / var, optional affine."""

  def __init__(self, c: int, affine: bool = True):
    self.mean, self.var = nnx.Param(jnp.zeros((c,))), nnx.Param(jnp.ones((c,)))
    self.scale = nnx.Param(jnp.ones((c,))) if affine else None
    self.bias = nnx.Param(jnp.zeros((c,))) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + EPS)
    return y * self.scale[...] + self.bias[...] if self.scale is not None else y


class PReLU(nnx.Module):
  def __init__(self, c: int):
    self.slope = nnx.Param(jnp.full((c,), 0.25))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, x, self.slope[...] * x)


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (k - 1) // 2
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                  rngs=rngs)


class Unit(nnx.Module):
  """One IR unit (BasicBlockIR)."""

  def __init__(self, cin: int, depth: int, stride: int, rngs: nnx.Rngs):
    self.stride = stride
    self.project = cin != depth
    if self.project:
      self.short_conv, self.short_bn = _conv(cin, depth, 1, stride, rngs), BatchNorm(depth)
    self.bn1, self.conv1 = BatchNorm(cin), _conv(cin, depth, 3, 1, rngs)
    self.bn2, self.prelu = BatchNorm(depth), PReLU(depth)
    self.conv2, self.bn3 = _conv(depth, depth, 3, stride, rngs), BatchNorm(depth)

  def __call__(self, x: jax.Array) -> jax.Array:
    short = self.short_bn(self.short_conv(x)) if self.project else x[:, ::self.stride, ::self.stride]
    return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))) + short


class IRBackbone(nnx.Module):
  """(B, 112, 112, 3) in [-1, 1] -> (B, 512) (not normalised)."""

  def __init__(self, num_layers: int = 100, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    if num_layers not in STAGES:
      raise ValueError(f'IR-{num_layers}: one of {sorted(STAGES)}')
    self.conv_in, self.bn_in, self.prelu_in = _conv(3, 64, 3, 1, rngs), BatchNorm(64), PReLU(64)
    units, cin = [], 64
    for n, depth in zip(STAGES[num_layers], DEPTHS):
      for i in range(n):
        units.append(Unit(cin, depth, 2 if i == 0 else 1, rngs))
        cin = depth
    self.units = nnx.List(units)
    self.bn_out = BatchNorm(512)
    self.linear = nnx.Linear(512 * 7 * 7, 512, rngs=rngs)
    self.bn_embed = BatchNorm(512, affine=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.prelu_in(self.bn_in(self.conv_in(x)))
    for unit in self.units:
      x = unit(x)
    x = self.bn_out(x)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch's Flatten of NCHW
    return self.bn_embed(self.linear(x))


def _num_layers(keys: set[str]) -> int:
  units = len({k.split('.')[1] for k in keys if k.startswith('body.')})
  by_units = {sum(v): k for k, v in STAGES.items()}
  if units not in by_units:
    raise ValueError(f'{units} IR units: not IR-{"/".join(map(str, sorted(STAGES)))}')
  return by_units[units]


def load(path: str) -> IRBackbone:
  """The benchmark's `.bin` (TFace key names: input_layer.*, body.N.shortcut_layer.* / res_layer.*,
  output_layer.*) -> IRBackbone; the depth is read from the number of units."""
  reader = common.CheckpointReader(path)
  keys = set(reader.keys())
  get = lambda k: np.asarray(reader.get(k), np.float32)
  model = IRBackbone(_num_layers(keys))
  used: set[str] = set()

  def put(param, key, value=None):
    value = get(key) if value is None else value
    used.add(key)
    if tuple(param.shape) != tuple(value.shape):
      raise ValueError(f'{path}: {key} is {value.shape}, the IR backbone wants {tuple(param.shape)}')
    param[...] = jnp.asarray(value)

  def conv(c, key):
    put(c.kernel, key, get(key).transpose(2, 3, 1, 0))

  def bn(b, key):
    put(b.mean, key + '.running_mean')
    put(b.var, key + '.running_var')
    used.add(key + '.num_batches_tracked')
    if b.scale is not None:
      put(b.scale, key + '.weight')
      put(b.bias, key + '.bias')

  conv(model.conv_in, 'input_layer.0.weight')
  bn(model.bn_in, 'input_layer.1')
  put(model.prelu_in.slope, 'input_layer.2.weight')
  for i, u in enumerate(model.units):
    p = f'body.{i}.'
    if u.project:
      conv(u.short_conv, p + 'shortcut_layer.0.weight')
      bn(u.short_bn, p + 'shortcut_layer.1')
    bn(u.bn1, p + 'res_layer.0')
    conv(u.conv1, p + 'res_layer.1.weight')
    bn(u.bn2, p + 'res_layer.2')
    put(u.prelu.slope, p + 'res_layer.3.weight')
    conv(u.conv2, p + 'res_layer.4.weight')
    bn(u.bn3, p + 'res_layer.5')
  bn(model.bn_out, 'output_layer.0')
  put(model.linear.kernel, 'output_layer.3.weight', get('output_layer.3.weight').T)
  put(model.linear.bias, 'output_layer.3.bias')
  bn(model.bn_embed, 'output_layer.4')
  unused = sorted(keys - used)
  if unused:
    raise ValueError(f'{path}: unexpected tensors {unused[:5]} (not a TFace IR backbone?)')
  return model

