"""OpenS2V-Eval's reference detector for NexusScore: YOLO-World v2-L with the image-prompt adapter, in Flax NNX,
loaded from the benchmark's `yolo_world_v2_l_image_prompt_adapter-719a7afb.pth` (an mmengine checkpoint).

Facts from the benchmark's `eval/get_nexusscore.py`, its config
`utils/yoloworld/configs/yolo_world_v2_l_vlpan_bn_2e-4_80e_8gpus_image_prompt_demo.py` and the mmyolo / YOLO-World
code it vendors (PKU-YuanGroup/OpenS2V-Nexus b452831; v1.1, 8cb7427, changed only its bookkeeping):
- the network: mmyolo's YOLOv8-L (`YOLOv8CSPDarknet` P5, deepen 1.0, widen 1.0, last stage 512 channels; every
  ConvModule a bias-free conv, BatchNorm eps 1e-3, SiLU), YOLO-World's `YOLOWorldPAFPN` whose CSP layers end in a
  max-sigmoid attention to the prompt (`MaxSigmoidCSPLayerWithTwoConv`; embed channels (128, 256, 256), heads
  (4, 8, 8), guide 512) and `YOLOWorldHeadModule` with the BatchNorm contrastive head (`use_bn_head=True`), DFL
  with reg_max 16 over strides (8, 16, 32);
- the prompt: the reference image through CLIP ViT-B/32 (`CLIPVisionModelWithProjection`, its processor), the image
  embedding L2-normalised, then the adapter's projector (Linear 512 -> 1024, GELU, Linear 1024 -> 512; the script
  applies it without the residual its training forward adds), L2-normalised again: one class;
- the image: the RGB frame as decoded, `YOLOv5KeepRatioResize(640)` (cv2 INTER_AREA when shrinking, else
  INTER_LINEAR), `LetterResize(640, allow_scale_up=False, pad 114)`, then `YOLOv5DetDataPreprocessor` with
  `bgr_to_rgb=True` swaps the channels of that RGB array (the benchmark's quirk: the network sees BGR) and
  divides by 255;
- the boxes: sigmoid scores, `DistancePointBBoxCoder` from priors at (x + 0.5, y + 0.5) x stride, the test config
  (score > 0.001, NMS IoU 0.7, 300 per image), rescaled to the frame (pad removed, / scale factor) and clamped to
  it; the script then runs NMS 0.7 again, keeps scores > 0.5 and at most 100 boxes.

One difference from the file as published: its `YOLOWorldImageDetector.extract_feat` reads `texts` before assigning
it when prompt embeddings are set (an UnboundLocalError on exactly this path); we run what it evidently means — the
image through the backbone, the prompt embeddings as the neck's and head's text features.

The backbone does not see the prompt, so a video's frames go through it once and the neck and head run once per
(frame, reference) pair: the same numbers as the script's one full pass per pair.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaleido_jax.convert import common
from kaleido_jax.eval import aesthetics
from kaleido_jax.eval import spread

BN_EPS = 1e-3           # mmyolo's norm_cfg: BN(momentum=0.03, eps=0.001)
IMAGE_SIZE = 640        # yolov8 base config img_scale, used by the test pipeline the image-prompt config inherits
PAD_VALUE = 114         # LetterResize pad_val
TEST_SCORE = 0.001      # model_test_cfg: score_thr, nms iou 0.7, max_per_img 300
NMS_IOU = 0.7
MAX_PER_IMAGE = 300
SCRIPT_SCORE = 0.5      # get_nexusscore.py yoloworld_inference: score_thr 0.5, nms_thr 0.7, max_num_boxes 100
SCRIPT_MAX_BOXES = 100
P5 = ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False), (512, None, 3, True, True))


def make_divisible(x: float, widen: float, divisor: int = 8) -> int:
  return math.ceil(x * widen / divisor) * divisor


def make_round(x: float, deepen: float) -> int:
  return max(round(x * deepen), 1) if x > 1 else x


@dataclasses.dataclass(frozen=True)
class Config:
  widen_factor: float = 1.0
  deepen_factor: float = 1.0
  last_stage_out_channels: int = 512
  embed_dims: int = 512                 # the prompt's width (CLIP ViT-B/32's projection)
  neck_embed_channels: tuple[int, ...] = (128, 256, 256)  # as built (the config's values after widen_factor)
  neck_num_heads: tuple[int, ...] = (4, 8, 8)
  num_csp_blocks: int = 3
  reg_max: int = 16
  strides: tuple[int, ...] = (8, 16, 32)
  num_train_classes: int = 80           # sets only the classification branch's width: max(in_channels[0], 80)

  @property
  def neck_channels(self) -> tuple[int, ...]:  # the yolov8 config's neck / head in_channels (= out_channels)
    return (256, 512, self.last_stage_out_channels)


class ConvBN(nnx.Module):
  """mmcv's ConvModule as mmyolo builds it: a bias-free conv (padding k // 2), BatchNorm, SiLU unless act=False."""

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1, act: bool = True, *, rngs: nnx.Rngs):
    p = k // 2
    self.conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return jax.nn.silu(x) if self.act else x


class Bottleneck(nnx.Module):
  """DarknetBottleneck (expansion 1, two 3x3 ConvModules), the input added back when `add_identity`."""

  def __init__(self, c: int, add_identity: bool, *, rngs: nnx.Rngs):
    self.conv1 = ConvBN(c, c, 3, rngs=rngs)
    self.conv2 = ConvBN(c, c, 3, rngs=rngs)
    self.add_identity = add_identity

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv2(self.conv1(x))
    return x + y if self.add_identity else y


class CSPLayer(nnx.Module):
  """CSPLayerWithTwoConv: a 1x1 conv split in two halves, bottlenecks chained on the second, every piece
  concatenated into a final 1x1 conv."""

  def __init__(self, cin: int, cout: int, num_blocks: int, add_identity: bool, *, rngs: nnx.Rngs, extra: int = 0):
    self.mid = int(cout * 0.5)
    self.main_conv = ConvBN(cin, 2 * self.mid, 1, rngs=rngs)
    self.blocks = nnx.List([Bottleneck(self.mid, add_identity, rngs=rngs) for _ in range(num_blocks)])
    self.final_conv = ConvBN((2 + extra + num_blocks) * self.mid, cout, 1, rngs=rngs)

  def pieces(self, x: jax.Array) -> list[jax.Array]:
    x = self.main_conv(x)
    out = [x[..., :self.mid], x[..., self.mid:]]
    for block in self.blocks:
      out.append(block(out[-1]))
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.final_conv(jnp.concatenate(self.pieces(x), axis=-1))


class MaxSigmoidAttn(nnx.Module):
  """MaxSigmoidAttnBlock: per head, the max over the prompts of <pixel embedding, prompt> / sqrt(head channels) plus a
  bias, through a sigmoid, gates a 3x3 conv of the input (with_scale off, as configured)."""

  def __init__(self, cin: int, cout: int, guide: int, embed: int, heads: int, *, rngs: nnx.Rngs):
    self.heads, self.head_channels = heads, embed // heads
    self.embed_conv = ConvBN(cin, embed, 1, act=False, rngs=rngs) if embed != cin else None
    self.guide_fc = nnx.Linear(guide, embed, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((heads,)))
    self.project_conv = ConvBN(cin, cout, 3, act=False, rngs=rngs)

  def __call__(self, x: jax.Array, guide: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    g = self.guide_fc(guide).reshape(b, -1, self.heads, self.head_channels)
    e = (self.embed_conv(x) if self.embed_conv is not None else x).reshape(b, h, w, self.heads, self.head_channels)
    attn = jnp.einsum('bhwmc,bnmc->bhwmn', e, g).max(axis=-1) / self.head_channels ** 0.5
    attn = jax.nn.sigmoid(attn + self.bias[...])
    y = self.project_conv(x).reshape(b, h, w, self.heads, -1) * attn[..., None]
    return y.reshape(b, h, w, -1)


class MaxSigmoidCSPLayer(CSPLayer):
  """MaxSigmoidCSPLayerWithTwoConv: CSPLayerWithTwoConv whose last piece also goes through the prompt attention."""

  def __init__(self, cin: int, cout: int, guide: int, embed: int, heads: int, num_blocks: int, *, rngs: nnx.Rngs):
    super().__init__(cin, cout, num_blocks, add_identity=False, rngs=rngs, extra=1)
    self.attn_block = MaxSigmoidAttn(self.mid, self.mid, guide, embed, heads, rngs=rngs)

  def __call__(self, x: jax.Array, guide: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
    out = self.pieces(x)
    out.append(self.attn_block(out[-1], guide))
    return self.final_conv(jnp.concatenate(out, axis=-1))


def max_pool5(x: jax.Array) -> jax.Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 5, 5, 1), (1, 1, 1, 1), ((0, 0), (2, 2), (2, 2), (0, 0)))


class SPPF(nnx.Module):
  """SPPFBottleneck: 1x1 conv to half width, three chained 5x5 max pools, all four concatenated, 1x1 conv."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv1 = ConvBN(cin, cin // 2, 1, rngs=rngs)
    self.conv2 = ConvBN(cin // 2 * 4, cout, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv1(x)
    y1 = max_pool5(x)
    y2 = max_pool5(y1)
    return self.conv2(jnp.concatenate([x, y1, y2, max_pool5(y2)], axis=-1))


class Backbone(nnx.Module):
  """YOLOv8CSPDarknet (P5): stem, four stages (stride-2 conv, CSP layer, SPPF on the last); stages 2-4 out."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    wf, df = cfg.widen_factor, cfg.deepen_factor
    self.stem = ConvBN(3, make_divisible(P5[0][0], wf), 3, 2, rngs=rngs)
    stages = []
    for cin, cout, blocks, add_identity, spp in P5:
      cin, cout = make_divisible(cin, wf), make_divisible(cout or cfg.last_stage_out_channels, wf)
      layers = [ConvBN(cin, cout, 3, 2, rngs=rngs), CSPLayer(cout, cout, make_round(blocks, df), add_identity,
                                                             rngs=rngs)]
      if spp:
        layers.append(SPPF(cout, cout, rngs=rngs))
      stages.append(nnx.List(layers))
    self.stages = nnx.List(stages)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    x = self.stem(x)
    outs = []
    for stage in self.stages:
      for layer in stage:
        x = layer(x)
      outs.append(x)
    return tuple(outs[1:])  # out_indices (2, 3, 4): the stem is index 0


def upsample2(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Neck(nnx.Module):
  """YOLOWorldPAFPN: YOLOv8's PAFPN (identity reduce / out layers, nearest 2x upsampling, upsampled features first
  in each concatenation) with MaxSigmoid CSP layers guided by the prompt."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    wf, c = cfg.widen_factor, cfg.neck_channels
    blocks, guide = make_round(cfg.num_csp_blocks, cfg.deepen_factor), cfg.embed_dims
    layer = lambda cin, cout, i: MaxSigmoidCSPLayer(
        make_divisible(cin, wf), make_divisible(cout, wf), guide, cfg.neck_embed_channels[i], cfg.neck_num_heads[i],
        blocks, rngs=rngs)
    self.top_down_layers = nnx.List([layer(c[i - 1] + c[i], c[i - 1], i - 1) for i in range(len(c) - 1, 0, -1)])
    self.downsample_layers = nnx.List([ConvBN(make_divisible(c[i], wf), make_divisible(c[i], wf), 3, 2, rngs=rngs)
                                       for i in range(len(c) - 1)])
    self.bottom_up_layers = nnx.List([layer(c[i] + c[i + 1], c[i + 1], i + 1) for i in range(len(c) - 1)])

  def __call__(self, feats: Sequence[jax.Array], guide: jax.Array) -> tuple[jax.Array, ...]:
    n = len(feats)
    inner = [feats[-1]]
    for j, idx in enumerate(range(n - 1, 0, -1)):
      inner.insert(0, self.top_down_layers[j](jnp.concatenate([upsample2(inner[0]), feats[idx - 1]], axis=-1), guide))
    outs = [inner[0]]
    for idx in range(n - 1):
      outs.append(self.bottom_up_layers[idx](
          jnp.concatenate([self.downsample_layers[idx](outs[-1]), inner[idx + 1]], axis=-1), guide))
    return tuple(outs)


class BNContrast(nnx.Module):
  """BNContrastiveHead: BatchNorm of the pixel embeddings, dot with the L2-normalised prompts, x exp(logit_scale)
  plus a bias."""

  def __init__(self, dims: int, *, rngs: nnx.Rngs):
    self.norm = nnx.BatchNorm(dims, use_running_average=True, epsilon=BN_EPS, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros(()))
    self.logit_scale = nnx.Param(-jnp.ones(()))

  def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps
    return jnp.einsum('bhwc,bkc->bhwk', self.norm(x), w) * jnp.exp(self.logit_scale[...]) + self.bias[...]


class Head(nnx.Module):
  """YOLOWorldHeadModule: per level a box branch (two 3x3 ConvModules, a 1x1 conv to 4 x reg_max) and a class
  branch (two 3x3 ConvModules, a 1x1 conv to the prompt width, the contrastive head)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    cin = [make_divisible(c, cfg.widen_factor) for c in cfg.neck_channels]
    reg = max(16, cin[0] // 4, cfg.reg_max * 4)
    cls = max(cin[0], cfg.num_train_classes)
    self.reg_max = cfg.reg_max
    branch = lambda c, mid, out: nnx.List([ConvBN(c, mid, 3, rngs=rngs), ConvBN(mid, mid, 3, rngs=rngs),
                                           nnx.Conv(mid, out, (1, 1), rngs=rngs)])
    self.reg_preds = nnx.List([branch(c, reg, 4 * cfg.reg_max) for c in cin])
    self.cls_preds = nnx.List([branch(c, cls, cfg.embed_dims) for c in cin])
    self.cls_contrasts = nnx.List([BNContrast(cfg.embed_dims, rngs=rngs) for _ in cin])

  def __call__(self, feats: Sequence[jax.Array], prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> logits (B, A, K) and box distances in strides (B, A, 4: left, top, right, bottom), levels concatenated
    row-major."""
    logits, dists = [], []
    for x, reg, cls, contrast in zip(feats, self.reg_preds, self.cls_preds, self.cls_contrasts):
      b, h, w, _ = x.shape
      c, r = x, x
      for layer in cls:
        c = layer(c)
      for layer in reg:
        r = layer(r)
      logits.append(contrast(c, prompts).reshape(b, h * w, -1))
      bins = jax.nn.softmax(r.reshape(b, h * w, 4, self.reg_max), axis=-1)  # DFL: the expected bin
      dists.append(bins @ jnp.arange(self.reg_max, dtype=bins.dtype))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(dists, axis=1)


class Projector(nnx.Module):
  """The image-prompt adapter's projector: Linear, GELU (exact), Linear."""

  def __init__(self, dims: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dims, 2 * dims, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dims, dims, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def priors(cfg: Config, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """MlvlPointGenerator(offset 0.5): (A, 2) anchor points (x, y) in pixels and (A,) strides, levels in order, x
  fastest."""
  points, strides = [], []
  for s in cfg.strides:
    n = size // s
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
    points.append(np.stack([(x.ravel() + 0.5) * s, (y.ravel() + 0.5) * s], axis=1))
    strides.append(np.full(n * n, s, np.float32))
  return np.concatenate(points).astype(np.float32), np.concatenate(strides)


class YOLOWorld(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs=rngs)
    self.neck = Neck(cfg, rngs=rngs)
    self.head = Head(cfg, rngs=rngs)
    self.projector = Projector(cfg.embed_dims, rngs=rngs)

  def prompt(self, clip_embeds: jax.Array) -> jax.Array:
    """CLIP image embeddings (R, E) -> the prompts (R, E) as get_nexusscore.py makes them (module docstring)."""
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return unit(self.projector(unit(clip_embeds)))

  def __call__(self, pixels: jax.Array, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pixels (F, 640, 640, 3) as the network sees them, prompts (F, R, E): every frame against each of its R
    prompts on its own (one class each) -> scores (F, R, A) after the sigmoid and boxes (F, R, A, 4) x1 y1 x2 y2 in
    the 640 x 640 letterboxed frame."""
    f, r = prompts.shape[:2]
    feats = [jnp.repeat(x, r, axis=0) for x in self.backbone(pixels)]  # the backbone once per frame
    guide = prompts.reshape(f * r, 1, -1)
    logits, dists = self.head(self.neck(feats, guide), guide)
    points, strides = priors(self.cfg, pixels.shape[1])
    d = dists * strides[None, :, None]
    boxes = jnp.concatenate([points - d[..., :2], points + d[..., 2:]], axis=-1)
    return jax.nn.sigmoid(logits[..., 0]).reshape(f, r, -1), boxes.reshape(f, r, -1, 4)


# ---------------------------------------------------------------------------------------------- loading


class _Recorder:
  """Reads tensors and remembers which, so that a checkpoint of another variant fails with the keys it leaves."""

  def __init__(self, reader: common.CheckpointReader):
    self.reader, self.used = reader, set()

  def __call__(self, key: str) -> np.ndarray:
    self.used.add(key)
    return np.asarray(self.reader.get(key), np.float32)


def _conv(conv: nnx.Conv, get, prefix: str) -> None:
  aesthetics.set_param(conv, 'kernel', get(prefix + '.weight').transpose(2, 3, 1, 0))
  if conv.bias is not None:
    aesthetics.set_param(conv, 'bias', get(prefix + '.bias'))


def _bn(bn: nnx.BatchNorm, get, prefix: str) -> None:
  for attr, name in (('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'), ('var', 'running_var')):
    aesthetics.set_param(bn, attr, get(f'{prefix}.{name}'))


def _convbn(m: ConvBN, get, prefix: str) -> None:
  _conv(m.conv, get, prefix + '.conv')
  _bn(m.bn, get, prefix + '.bn')


def _csp(m: CSPLayer, get, prefix: str) -> None:
  _convbn(m.main_conv, get, prefix + '.main_conv')
  _convbn(m.final_conv, get, prefix + '.final_conv')
  for j, block in enumerate(m.blocks):
    _convbn(block.conv1, get, f'{prefix}.blocks.{j}.conv1')
    _convbn(block.conv2, get, f'{prefix}.blocks.{j}.conv2')
  if isinstance(m, MaxSigmoidCSPLayer):
    a, p = m.attn_block, prefix + '.attn_block'
    if a.embed_conv is not None:
      _convbn(a.embed_conv, get, p + '.embed_conv')
    aesthetics.load_linear(a.guide_fc, get, p + '.guide_fc')
    aesthetics.set_param(a, 'bias', get(p + '.bias'))
    _convbn(a.project_conv, get, p + '.project_conv')


PREFIXES = ('backbone.image_model.', 'neck.', 'bbox_head.head_module.', 'image_prompt_encoder.projector.')


def config_of(reader: common.CheckpointReader) -> Config:
  """The variant's widths and depth from the checkpoint's shapes (v2-L: widen 1.0, deepen 1.0, last stage 512)."""
  b = 'backbone.image_model.'
  widen = reader.shape(b + 'stem.conv.weight')[0] / 64
  last = round(reader.shape(b + 'stage4.0.conv.weight')[0] / widen)
  blocks = len({k.split('.')[5] for k in reader.keys() if k.startswith(b + 'stage1.1.blocks.')})
  deepen = blocks / 3
  heads = tuple(reader.shape(f'neck.{n}.attn_block.bias')[0] for n in
                ('top_down_layers.1', 'top_down_layers.0', 'bottom_up_layers.1'))
  embed = tuple(reader.shape(f'neck.{n}.attn_block.guide_fc.weight')[0] for n in
                ('top_down_layers.1', 'top_down_layers.0', 'bottom_up_layers.1'))
  cls = reader.shape('bbox_head.head_module.cls_preds.0.0.conv.weight')[0]  # max(in_channels[0], classes)
  return Config(widen_factor=widen, deepen_factor=deepen, last_stage_out_channels=last,
                embed_dims=reader.shape('bbox_head.head_module.cls_preds.0.2.weight')[0],
                neck_embed_channels=embed, neck_num_heads=heads,
                num_train_classes=cls if cls > make_divisible(256, widen) else Config.num_train_classes)


def load(path: str) -> YOLOWorld:
  """The benchmark's YOLO-World image-prompt checkpoint (.pth, mmengine's {'meta', 'state_dict'}) -> the network."""
  reader = common.CheckpointReader(path)
  if 'backbone.image_model.stem.conv.weight' not in reader or 'image_prompt_encoder.projector.0.weight' not in reader:
    raise ValueError(f'{path!r} is not a YOLO-World image-prompt checkpoint (no backbone.image_model.stem / '
                     'image_prompt_encoder.projector tensors): NexusScore needs '
                     'yolo_world_v2_l_image_prompt_adapter-719a7afb.pth')
  model = nnx.eval_shape(lambda: YOLOWorld(config_of(reader)))
  get = _Recorder(reader)
  b = 'backbone.image_model.'
  _convbn(model.backbone.stem, get, b + 'stem')
  for i, stage in enumerate(model.backbone.stages):
    _convbn(stage[0], get, f'{b}stage{i + 1}.0')
    _csp(stage[1], get, f'{b}stage{i + 1}.1')
    if len(stage) > 2:
      _convbn(stage[2].conv1, get, f'{b}stage{i + 1}.2.conv1')
      _convbn(stage[2].conv2, get, f'{b}stage{i + 1}.2.conv2')
  for name in ('top_down_layers', 'bottom_up_layers'):
    for j, layer in enumerate(getattr(model.neck, name)):
      _csp(layer, get, f'neck.{name}.{j}')
  for j, layer in enumerate(model.neck.downsample_layers):
    _convbn(layer, get, f'neck.downsample_layers.{j}')
  h = 'bbox_head.head_module.'
  for i in range(len(model.head.reg_preds)):
    for name in ('reg_preds', 'cls_preds'):
      branch = getattr(model.head, name)[i]
      _convbn(branch[0], get, f'{h}{name}.{i}.0')
      _convbn(branch[1], get, f'{h}{name}.{i}.1')
      _conv(branch[2], get, f'{h}{name}.{i}.2')
    c = model.head.cls_contrasts[i]
    _bn(c.norm, get, f'{h}cls_contrasts.{i}.norm')
    aesthetics.set_param(c, 'bias', get(f'{h}cls_contrasts.{i}.bias'))
    aesthetics.set_param(c, 'logit_scale', get(f'{h}cls_contrasts.{i}.logit_scale'))
  aesthetics.load_linear(model.projector.fc1, get, 'image_prompt_encoder.projector.0')
  aesthetics.load_linear(model.projector.fc2, get, 'image_prompt_encoder.projector.2')
  left = sorted(k for k in reader.keys() if k.startswith(PREFIXES) and k not in get.used
                and not k.endswith('num_batches_tracked'))
  if left:
    raise ValueError(f'{path!r}: {len(left)} tensors of the detector this YOLO-World does not have (another '
                     f'variant?), e.g. {left[:3]}')
  return model


# ---------------------------------------------------------------------------------------------- the image


@dataclasses.dataclass(frozen=True)
class Letterbox:
  """How a frame was fitted into 640 x 640: (w, h) scale factor, (top, left) padding, the frame's (h, w)."""
  scale: tuple[float, float]
  pad: tuple[int, int]
  shape: tuple[int, int]


def letterbox(rgb: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, Letterbox]:
  """An RGB uint8 frame -> (size, size, 3) float32 as the network sees it (channels swapped, / 255), and its
  Letterbox: YOLOv5KeepRatioResize then LetterResize (module docstring)."""
  import cv2  # lazy: an optional dependency (the grounding / opens2v extras)
  img = np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., :3])
  h0, w0 = img.shape[:2]
  ratio = min(size / max(h0, w0), size / min(h0, w0))
  if ratio != 1:
    img = cv2.resize(img, (int(w0 * ratio), int(h0 * ratio)),
                     interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
  h1, w1 = img.shape[:2]
  r = min(size / h1, size / w1, 1.0)  # allow_scale_up=False
  nh, nw = int(round(h1 * r)), int(round(w1 * r))
  if (nh, nw) != (h1, w1):
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
  ph, pw = size - nh, size - nw
  top, left = int(round(ph // 2 - 0.1)), int(round(pw // 2 - 0.1))
  img = cv2.copyMakeBorder(img, top, ph - top, left, pw - left, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
  scale = ((nw / w1) * (w1 / w0), (nh / h1) * (h1 / h0))  # LetterResize's factor times KeepRatioResize's, as mmyolo
  return img[..., ::-1].astype(np.float32) / 255.0, Letterbox(scale, (top, left), (h0, w0))


# ---------------------------------------------------------------------------------------------- the boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
  """Greedy NMS (mmcv / torchvision: areas without the +1 offset, a box dropped when its IoU with a kept one exceeds
  `iou`; two boxes of no area have IoU 0 / 0, which exceeds nothing, so both stay) -> kept indices by decreasing
  score."""
  order = np.argsort(-scores, kind='stable')
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  keep = []
  while order.size:
    i, rest = order[0], order[1:]
    keep.append(i)
    wh = np.clip(np.minimum(boxes[i, 2:], boxes[rest, 2:]) - np.maximum(boxes[i, :2], boxes[rest, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    with np.errstate(invalid='ignore', divide='ignore'):
      order = rest[~(inter / (area[i] + area[rest] - inter) > iou)]
  return np.asarray(keep, np.int64)


def boxes_in_frame(scores: np.ndarray, boxes: np.ndarray, box: Letterbox) -> tuple[np.ndarray, np.ndarray]:
  """One (frame, prompt)'s scores (A,) and letterboxed boxes (A, 4) -> what get_nexusscore.py keeps: (boxes (n, 4)
  in the frame's pixels, scores (n,)), by decreasing score.

  Only boxes above the script's 0.5 enter: a box of lower score never suppresses a higher one in greedy NMS and the
  300-box cut keeps the highest, so the kept boxes above 0.5 are those of the test config's pass over every box
  above 0.001 (module docstring)."""
  sel = np.nonzero(scores > max(TEST_SCORE, SCRIPT_SCORE))[0]
  s, b = scores[sel].astype(np.float32), boxes[sel].astype(np.float32)
  top, left = box.pad
  b = (b - np.asarray([left, top, left, top], np.float32)) / np.asarray(box.scale * 2, np.float32)
  keep = nms(b, s, NMS_IOU)[:MAX_PER_IMAGE]
  s, b = s[keep], b[keep]
  b[:, 0::2] = np.clip(b[:, 0::2], 0, box.shape[1])
  b[:, 1::2] = np.clip(b[:, 1::2], 0, box.shape[0])
  keep = nms(b, s, NMS_IOU)  # the script's own NMS, on the clamped boxes
  s, b = s[keep], b[keep]
  return b[:SCRIPT_MAX_BOXES], s[:SCRIPT_MAX_BOXES]


class Detector:
  """Frames x reference prompts -> per (frame, reference) the boxes get_nexusscore.py keeps, the network jitted and
  its frames spread over this host's devices."""

  def __init__(self, model: YOLOWorld, clip: aesthetics.CLIPVisionTower, clip_preprocess: aesthetics.Preprocess):
    graph, state = nnx.split((model, clip))
    self.clip_preprocess = clip_preprocess

    def prompts(state, pixels):
      model, clip = nnx.merge(graph, state)
      return model.prompt(clip(pixels))
    self._prompts = jax.jit(prompts)
    self._detect = spread.OverDevices(lambda s, x, p: nnx.merge(graph, s)[0](x, p), state, num_batched=2)

  def prompts(self, references: Sequence[np.ndarray]) -> np.ndarray:
    """Reference images (RGB) -> (R, E) prompt embeddings."""
    return np.asarray(self._prompts(self._detect.state, np.stack([self.clip_preprocess(r) for r in references])))

  def __call__(self, frames: Sequence[np.ndarray], prompts: np.ndarray) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """-> [frame][reference] (boxes (n, 4) in the frame's pixels, scores (n,))."""
    fitted = [letterbox(f) for f in frames]
    pixels = np.stack([x for x, _ in fitted])
    scores, boxes = self._detect(pixels, np.broadcast_to(prompts[None], (len(frames),) + prompts.shape).copy())
    return [[boxes_in_frame(scores[i, r], boxes[i, r], fitted[i][1]) for r in range(len(prompts))]
            for i in range(len(frames))]


def build(model_path: str, clip_dir: str) -> Detector:
  """The detector from the benchmark's checkpoint and a transformers CLIP ViT-B/32 directory."""
  return Detector(load(model_path), aesthetics.load_clip(clip_dir), aesthetics.Preprocess.from_dir(clip_dir))

