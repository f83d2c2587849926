"""YOLO-World v2 (image-prompt adapter) in PyTorch, restated from the definitions the benchmark vendors (mmyolo's
ConvModule / DarknetBottleneck / CSPLayerWithTwoConv / SPPFBottleneck / YOLOv8CSPDarknet / YOLOv8PAFPN, YOLO-World's
MaxSigmoidAttnBlock / MaxSigmoidCSPLayerWithTwoConv / YOLOWorldPAFPN / BNContrastiveHead / YOLOWorldHeadModule /
ImagePromptEncoder.projector, PKU-YuanGroup/OpenS2V-Nexus b452831 `eval/utils/yoloworld`), in NCHW with their module
names, so that `state_dict()` has the checkpoint's keys. mmcv / mmdet / mmyolo cannot be installed beside our stack;
this file is what the parity tests compare against. Also the test pipeline's image steps and predict_by_feat's box
steps, written the way mmyolo writes them (a torch loop NMS)."""

import math

import cv2
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def make_divisible(x, widen, divisor=8):
  return math.ceil(x * widen / divisor) * divisor


def make_round(x, deepen):
  return max(round(x * deepen), 1) if x > 1 else x


class ConvModule(nn.Module):
  def __init__(self, cin, cout, k, stride=1, padding=0, act=True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)  # bias='auto' is off under a norm
    self.bn = nn.BatchNorm2d(cout, momentum=0.03, eps=0.001)
    self.activate = nn.SiLU() if act else None

  def forward(self, x):
    x = self.bn(self.conv(x))
    return self.activate(x) if self.activate is not None else x


class DarknetBottleneck(nn.Module):
  def __init__(self, cin, cout, add_identity):
    super().__init__()
    self.conv1 = ConvModule(cin, cout, 3, padding=1)
    self.conv2 = ConvModule(cout, cout, 3, padding=1)
    self.add_identity = add_identity and cin == cout

  def forward(self, x):
    out = self.conv2(self.conv1(x))
    return out + x if self.add_identity else out


class CSPLayerWithTwoConv(nn.Module):
  def __init__(self, cin, cout, num_blocks=1, add_identity=True):
    super().__init__()
    self.mid_channels = int(cout * 0.5)
    self.main_conv = ConvModule(cin, 2 * self.mid_channels, 1)
    self.final_conv = ConvModule((2 + num_blocks) * self.mid_channels, cout, 1)
    self.blocks = nn.ModuleList(DarknetBottleneck(self.mid_channels, self.mid_channels, add_identity)
                                for _ in range(num_blocks))

  def forward(self, x):
    x_main = self.main_conv(x)
    x_main = list(x_main.split((self.mid_channels, self.mid_channels), 1))
    x_main.extend(blocks(x_main[-1]) for blocks in self.blocks)
    return self.final_conv(torch.cat(x_main, 1))


class MaxSigmoidAttnBlock(nn.Module):
  def __init__(self, cin, cout, guide_channels, embed_channels, num_heads=1):
    super().__init__()
    self.num_heads = num_heads
    self.head_channels = embed_channels // num_heads
    self.embed_conv = ConvModule(cin, embed_channels, 1, act=False) if embed_channels != cin else None
    self.guide_fc = nn.Linear(guide_channels, embed_channels)
    self.bias = nn.Parameter(torch.zeros(num_heads))
    self.scale = 1.0
    self.project_conv = ConvModule(cin, cout, 3, padding=1, act=False)

  def forward(self, x, guide):
    B, _, H, W = x.shape
    guide = self.guide_fc(guide)
    guide = guide.reshape(B, -1, self.num_heads, self.head_channels)
    embed = self.embed_conv(x) if self.embed_conv is not None else x
    embed = embed.reshape(B, self.num_heads, self.head_channels, H, W)
    attn_weight = torch.einsum('bmchw,bnmc->bmhwn', embed, guide)
    attn_weight = attn_weight.max(dim=-1)[0]
    attn_weight = attn_weight / (self.head_channels ** 0.5)
    attn_weight = attn_weight + self.bias[None, :, None, None]
    attn_weight = attn_weight.sigmoid() * self.scale
    x = self.project_conv(x)
    x = x.reshape(B, self.num_heads, -1, H, W)
    x = x * attn_weight.unsqueeze(2)
    return x.reshape(B, -1, H, W)


class MaxSigmoidCSPLayerWithTwoConv(CSPLayerWithTwoConv):
  def __init__(self, cin, cout, guide_channels, embed_channels, num_heads=1, num_blocks=1):
    super().__init__(cin, cout, num_blocks=num_blocks, add_identity=False)
    self.final_conv = ConvModule((3 + num_blocks) * self.mid_channels, cout, 1)
    self.attn_block = MaxSigmoidAttnBlock(self.mid_channels, self.mid_channels, guide_channels, embed_channels,
                                          num_heads)

  def forward(self, x, guide):
    x_main = self.main_conv(x)
    x_main = list(x_main.split((self.mid_channels, self.mid_channels), 1))
    x_main.extend(blocks(x_main[-1]) for blocks in self.blocks)
    x_main.append(self.attn_block(x_main[-1], guide))
    return self.final_conv(torch.cat(x_main, 1))


class SPPFBottleneck(nn.Module):
  def __init__(self, cin, cout, kernel_sizes=5):
    super().__init__()
    mid = int(cin * 0.5)
    self.conv1 = ConvModule(cin, mid, 1)
    self.poolings = nn.MaxPool2d(kernel_size=kernel_sizes, stride=1, padding=kernel_sizes // 2)
    self.conv2 = ConvModule(mid * 4, cout, 1)

  def forward(self, x):
    x = self.conv1(x)
    y1 = self.poolings(x)
    y2 = self.poolings(y1)
    return self.conv2(torch.cat([x, y1, y2, self.poolings(y2)], dim=1))


class YOLOv8CSPDarknet(nn.Module):
  def __init__(self, last_stage_out_channels=512, deepen=1.0, widen=1.0):
    super().__init__()
    arch = [[64, 128, 3, True, False], [128, 256, 6, True, False], [256, 512, 6, True, False],
            [512, last_stage_out_channels, 3, True, True]]
    self.stem = ConvModule(3, make_divisible(arch[0][0], widen), 3, 2, 1)
    self.layers = ['stem']
    for i, (cin, cout, n, add, spp) in enumerate(arch):
      cin, cout = make_divisible(cin, widen), make_divisible(cout, widen)
      stage = [ConvModule(cin, cout, 3, 2, 1), CSPLayerWithTwoConv(cout, cout, make_round(n, deepen), add)]
      if spp:
        stage.append(SPPFBottleneck(cout, cout, 5))
      self.add_module(f'stage{i + 1}', nn.Sequential(*stage))
      self.layers.append(f'stage{i + 1}')
    self.out_indices = (2, 3, 4)

  def forward(self, x):
    outs = []
    for i, name in enumerate(self.layers):
      x = getattr(self, name)(x)
      if i in self.out_indices:
        outs.append(x)
    return tuple(outs)


class YOLOWorldPAFPN(nn.Module):
  def __init__(self, in_channels, out_channels, guide_channels, embed_channels, num_heads, deepen=1.0, widen=1.0,
               num_csp_blocks=3):
    super().__init__()
    self.in_channels, self.out_channels = in_channels, out_channels
    self.reduce_layers = nn.ModuleList(nn.Identity() for _ in in_channels)
    self.upsample_layers, self.top_down_layers = nn.ModuleList(), nn.ModuleList()
    for idx in range(len(in_channels) - 1, 0, -1):
      self.upsample_layers.append(nn.Upsample(scale_factor=2, mode='nearest'))
      self.top_down_layers.append(MaxSigmoidCSPLayerWithTwoConv(
          make_divisible(in_channels[idx - 1] + in_channels[idx], widen),
          make_divisible(out_channels[idx - 1], widen), guide_channels,
          make_round(embed_channels[idx - 1], widen), make_round(num_heads[idx - 1], widen),
          make_round(num_csp_blocks, deepen)))
    self.downsample_layers, self.bottom_up_layers = nn.ModuleList(), nn.ModuleList()
    for idx in range(len(in_channels) - 1):
      c = make_divisible(in_channels[idx], widen)
      self.downsample_layers.append(ConvModule(c, c, 3, 2, 1))
      self.bottom_up_layers.append(MaxSigmoidCSPLayerWithTwoConv(
          make_divisible(out_channels[idx] + out_channels[idx + 1], widen),
          make_divisible(out_channels[idx + 1], widen), guide_channels,
          make_round(embed_channels[idx + 1], widen), make_round(num_heads[idx + 1], widen),
          make_round(num_csp_blocks, deepen)))
    self.out_layers = nn.ModuleList(nn.Identity() for _ in in_channels)

  def forward(self, img_feats, txt_feats):
    reduce_outs = [self.reduce_layers[i](img_feats[i]) for i in range(len(self.in_channels))]
    inner_outs = [reduce_outs[-1]]
    for idx in range(len(self.in_channels) - 1, 0, -1):
      feat_high, feat_low = inner_outs[0], reduce_outs[idx - 1]
      upsample_feat = self.upsample_layers[len(self.in_channels) - 1 - idx](feat_high)
      inner_out = self.top_down_layers[len(self.in_channels) - 1 - idx](torch.cat([upsample_feat, feat_low], 1),
                                                                          txt_feats)
      inner_outs.insert(0, inner_out)
    outs = [inner_outs[0]]
    for idx in range(len(self.in_channels) - 1):
      downsample_feat = self.downsample_layers[idx](outs[-1])
      outs.append(self.bottom_up_layers[idx](torch.cat([downsample_feat, inner_outs[idx + 1]], 1), txt_feats))
    return tuple(self.out_layers[i](outs[i]) for i in range(len(self.in_channels)))


class BNContrastiveHead(nn.Module):
  def __init__(self, embed_dims):
    super().__init__()
    self.norm = nn.BatchNorm2d(embed_dims, momentum=0.03, eps=0.001)
    self.bias = nn.Parameter(torch.zeros([]))
    self.logit_scale = nn.Parameter(-1.0 * torch.ones([]))

  def forward(self, x, w):
    x = self.norm(x)
    w = F.normalize(w, dim=-1, p=2)
    x = torch.einsum('bchw,bkc->bkhw', x, w)
    return x * self.logit_scale.exp() + self.bias


class YOLOWorldHeadModule(nn.Module):
  def __init__(self, in_channels, embed_dims=512, num_classes=80, reg_max=16, widen=1.0):
    super().__init__()
    in_channels = [make_divisible(c, widen) for c in in_channels]
    self.reg_max = reg_max
    reg_out = max((16, in_channels[0] // 4, reg_max * 4))
    cls_out = max(in_channels[0], num_classes)
    self.cls_preds, self.reg_preds, self.cls_contrasts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for c in in_channels:
      self.reg_preds.append(nn.Sequential(ConvModule(c, reg_out, 3, 1, 1), ConvModule(reg_out, reg_out, 3, 1, 1),
                                          nn.Conv2d(reg_out, 4 * reg_max, 1)))
      self.cls_preds.append(nn.Sequential(ConvModule(c, cls_out, 3, 1, 1), ConvModule(cls_out, cls_out, 3, 1, 1),
                                          nn.Conv2d(cls_out, embed_dims, 1)))
      self.cls_contrasts.append(BNContrastiveHead(embed_dims))
    self.register_buffer('proj', torch.arange(reg_max, dtype=torch.float), persistent=False)

  def forward_single(self, img_feat, txt_feat, cls_pred, reg_pred, cls_contrast):
    b, _, h, w = img_feat.shape
    cls_logit = cls_contrast(cls_pred(img_feat), txt_feat)
    bbox_dist_preds = reg_pred(img_feat).reshape([-1, 4, self.reg_max, h * w]).permute(0, 3, 1, 2)
    bbox_preds = bbox_dist_preds.softmax(3).matmul(self.proj.view([-1, 1])).squeeze(-1)
    return cls_logit, bbox_preds.transpose(1, 2).reshape(b, -1, h, w)

  def forward(self, img_feats, txt_feats):
    out = [self.forward_single(x, txt_feats, c, r, k)
           for x, c, r, k in zip(img_feats, self.cls_preds, self.reg_preds, self.cls_contrasts)]
    return [o[0] for o in out], [o[1] for o in out]


class _Holder(nn.Module):
  pass


class YOLOWorldImageDetector(nn.Module):
  """The checkpoint's module tree: backbone.image_model, neck, bbox_head.head_module, image_prompt_encoder.projector."""

  def __init__(self, deepen=1.0, widen=1.0, last_stage_out_channels=512, embed_dims=512,
               neck_embed=(128, 256, 256), neck_heads=(4, 8, 8), num_classes=80, strides=(8, 16, 32)):
    super().__init__()
    channels = [256, 512, last_stage_out_channels]
    self.backbone = _Holder()
    self.backbone.image_model = YOLOv8CSPDarknet(last_stage_out_channels, deepen, widen)
    self.neck = YOLOWorldPAFPN(channels, channels, embed_dims, list(neck_embed), list(neck_heads), deepen, widen)
    self.bbox_head = _Holder()
    self.bbox_head.head_module = YOLOWorldHeadModule(channels, embed_dims, num_classes, 16, widen)
    self.image_prompt_encoder = _Holder()
    self.image_prompt_encoder.projector = nn.Sequential(nn.Linear(embed_dims, embed_dims * 2), nn.GELU(),
                                                        nn.Linear(embed_dims * 2, embed_dims))
    self.strides = strides

  def forward(self, inputs, txt_feats):
    img_feats = self.backbone.image_model(inputs)
    img_feats = self.neck(img_feats, txt_feats)
    return self.bbox_head.head_module(img_feats, txt_feats)

  def prompt(self, clip_image_embeds):
    """get_nexusscore.py's generate_image_embeddings + run_image: normalise, project, normalise."""
    x = clip_image_embeds / clip_image_embeds.norm(p=2, dim=-1, keepdim=True)
    x = self.image_prompt_encoder.projector(x)
    return x / x.norm(p=2, dim=-1, keepdim=True)

  def decoded(self, inputs, txt_feats):
    """predict_by_feat's first steps: sigmoid scores (B, A, K) and DistancePointBBoxCoder boxes (B, A, 4)."""
    cls_scores, bbox_preds = self(inputs, txt_feats)
    num_imgs, k = inputs.shape[0], txt_feats.shape[1]
    priors, strides = [], []
    for score, s in zip(cls_scores, self.strides):
      h, w = score.shape[2:]
      shift_x, shift_y = (torch.arange(w) + 0.5) * s, (torch.arange(h) + 0.5) * s
      yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
      priors.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))
      strides.append(torch.full((h * w,), float(s)))
    priors, stride = torch.cat(priors), torch.cat(strides)
    scores = torch.cat([c.permute(0, 2, 3, 1).reshape(num_imgs, -1, k) for c in cls_scores], 1).sigmoid()
    dist = torch.cat([b.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4) for b in bbox_preds], 1)
    dist = dist * stride[None, :, None]
    p = priors[None]
    boxes = torch.stack([p[..., 0] - dist[..., 0], p[..., 1] - dist[..., 1], p[..., 0] + dist[..., 2],
                         p[..., 1] + dist[..., 3]], -1)
    return scores, boxes


def randomise(model, seed=0):
  """Random weights with BatchNorm statistics away from (0, 1), so that a wrong norm or layout shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 4:
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p[0].numel())))
      elif name.endswith('logit_scale'):
        p.fill_(0.3)
      elif p.ndim == 0:
        p.fill_(0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith('bn.weight') or
                                                           name.endswith('norm.weight') else 0.0))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
      elif name.endswith('running_var'):
        b.copy_(torch.rand(b.shape, generator=g) + 0.5)
  return model.eval()


def test_pipeline(rgb):
  """YOLOv5KeepRatioResize(640) + LetterResize(640, allow_scale_up=False, pad 114) + PackDetInputs +
  YOLOv5DetDataPreprocessor(bgr_to_rgb) on the RGB array the script passes -> (1, 3, 640, 640) tensor and the meta
  (scale_factor (w, h), pad_param [top, bottom, left, right], ori_shape (h, w))."""
  image = rgb
  original_h, original_w = image.shape[:2]
  ratio = min(max((640, 640)) / max(original_h, original_w), min((640, 640)) / min(original_h, original_w))
  if ratio != 1:
    image = cv2.resize(image, (int(original_w * ratio), int(original_h * ratio)),
                       interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
  scale_factor_origin = (image.shape[1] / original_w, image.shape[0] / original_h)
  scale = (640, 640)
  image_shape = image.shape[:2]
  r = min(min(scale[0] / image_shape[0], scale[1] / image_shape[1]), 1.0)
  no_pad_shape = (int(round(image_shape[0] * r)), int(round(image_shape[1] * r)))
  padding_h, padding_w = scale[0] - no_pad_shape[0], scale[1] - no_pad_shape[1]
  if image_shape != no_pad_shape:
    image = cv2.resize(image, (no_pad_shape[1], no_pad_shape[0]), interpolation=cv2.INTER_LINEAR)
  scale_factor = (no_pad_shape[1] / image_shape[1], no_pad_shape[0] / image_shape[0])
  top, left = int(round(padding_h // 2 - 0.1)), int(round(padding_w // 2 - 0.1))
  bottom, right = padding_h - top, padding_w - left
  image = np.pad(image, ((top, bottom), (left, right), (0, 0)), constant_values=114)
  scale_factor = (scale_factor[0] * scale_factor_origin[0], scale_factor[1] * scale_factor_origin[1])
  x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
  x = x[:, [2, 1, 0], ...].float() / 255.0
  return x, dict(scale_factor=scale_factor, pad_param=np.array([top, bottom, left, right], np.float32),
                 ori_shape=(original_h, original_w))


def nms(boxes, scores, iou_threshold):
  order = torch.argsort(scores, descending=True, stable=True)  # ties by index (see predict_boxes)
  keep = []
  while order.numel():
    i = order[0]
    keep.append(int(i))
    if order.numel() == 1:
      break
    rest = order[1:]
    x1 = torch.maximum(boxes[i, 0], boxes[rest, 0])
    y1 = torch.maximum(boxes[i, 1], boxes[rest, 1])
    x2 = torch.minimum(boxes[i, 2], boxes[rest, 2])
    y2 = torch.minimum(boxes[i, 3], boxes[rest, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / (area(boxes[i]) + area(boxes[rest]) - inter)
    order = rest[~(iou > iou_threshold)]  # mmcv / torchvision: suppressed when IoU > threshold (NaN never is)
  return torch.tensor(keep, dtype=torch.long)


def predict_boxes(scores, boxes, meta):
  """One image, one class: filter_scores_and_topk(0.001, 30000), rescale, batched_nms 0.7, 300, clamp; then the
  script's nms 0.7, > 0.5, top 100 -> (boxes (n, 4), scores (n,)) numpy. Equal scores (random weights give them by
  the thousand: the flat letterbox padding) are taken in anchor order, which the benchmark's sort does not fix."""
  s = scores[:, 0]
  valid = torch.nonzero(s > 0.001)[:, 0]
  s = s[valid]
  s, order = s.sort(descending=True, stable=True)  # exact ties: the GPU's order is arbitrary; here the anchors'
  s, keep_idxs = s[:30000], valid[order][:30000]
  b = boxes[keep_idxs].clone()
  pad = meta['pad_param']
  b -= b.new_tensor([pad[2], pad[0], pad[2], pad[0]])
  b /= b.new_tensor(meta['scale_factor']).repeat((1, 2))
  keep = nms(b, s, 0.7)[:300]
  b, s = b[keep], s[keep]
  b[:, 0::2].clamp_(0, meta['ori_shape'][1])
  b[:, 1::2].clamp_(0, meta['ori_shape'][0])
  keep = nms(b, s, 0.7)
  b, s = b[keep], s[keep]
  sel = s.float() > 0.5
  b, s = b[sel], s[sel]
  if len(s) > 100:  # topk, ties in index order (as above)
    idx = torch.sort(s, descending=True, stable=True)[1][:100]
    b, s = b[idx], s[idx]
  return b.numpy(), s.numpy()


class HistoryBuffer:
  """Stands in for mmengine's own objects in a checkpoint's 'meta' / 'message_hub' (torch's weights-only loader
  refuses them)."""

  def __init__(self):
    self.data = [1.0, 2.0]


def save_mmengine(model, path):
  """A checkpoint the way mmengine's runner saves one: meta with objects of its own, the (EMA-swapped) state dict."""
  torch.save({'meta': {'epoch': 80, 'iter': 1000, 'mmengine_version': '0.10.4', 'buffer': HistoryBuffer()},
              'state_dict': model.state_dict(), 'message_hub': {'log_scalars': HistoryBuffer()}}, path)
