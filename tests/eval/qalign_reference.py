"""Q-Align (mPLUG-Owl2 as `q_align/model/` defines it, vendored by OpenS2V-Eval v1.1, PKU-YuanGroup/OpenS2V-Nexus
8cb7427) in PyTorch for the parity tests, with one-align's state-dict names: the vision tower is transformers'
CLIPVisionModel (the same network: its q / k / v are packed per head into `query_key_value` when saved, and the
final LayerNorm is applied to every token), the visual abstractor and the modality-adaptive LLaMA are restated
from the Q-Align files (the LLaMA restatement is itself checked against transformers' LlamaModel on text)."""

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import transformers


def sincos_1d(dim, pos):
  omega = np.arange(dim // 2, dtype=np.float32)
  omega /= dim / 2.0
  omega = 1.0 / 10000 ** omega
  out = np.einsum('m,d->md', pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid_size):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, dim]), emb], axis=0)


class AbstractorAttention(nn.Module):
  def __init__(self, d, heads, queries, grid):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    self.register_buffer('q_pos_embed', torch.from_numpy(sincos_1d(d, np.arange(queries, dtype=np.float32))).float())
    self.register_buffer('k_pos_embed', torch.from_numpy(sincos_2d(d, grid)).float())

  def split(self, x):
    return x.view(x.shape[:-1] + (self.heads, -1)).permute(0, 2, 1, 3)

  def forward(self, hidden_states, encoder_hidden_states):
    qk_pos = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).unsqueeze(0)
    key = self.split(self.key(encoder_hidden_states + qk_pos))
    value = self.split(self.value(encoder_hidden_states))
    query = self.split(self.query(hidden_states + self.q_pos_embed.unsqueeze(0)))
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    ctx = torch.matmul(scores.softmax(-1), value).permute(0, 2, 1, 3).contiguous()
    return ctx.view(ctx.shape[:-2] + (-1,))


class AbstractorMLP(nn.Module):
  def __init__(self, d, inner, eps):
    super().__init__()
    self.w1, self.w2, self.w3 = nn.Linear(d, inner), nn.Linear(inner, d), nn.Linear(d, inner)
    self.ffn_ln = nn.LayerNorm(inner, eps=eps)

  def forward(self, x):
    return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
  def __init__(self, d, inner, eps):
    super().__init__()
    self.out_proj, self.norm2, self.mlp = nn.Linear(d, d), nn.LayerNorm(d), AbstractorMLP(d, inner, eps)

  def forward(self, hidden_states, input_tensor):
    input_tensor = input_tensor + self.out_proj(hidden_states)
    return input_tensor + self.mlp(self.norm2(input_tensor))


class CrossAttention(nn.Module):
  def __init__(self, d, heads, inner, eps, queries, grid):
    super().__init__()
    self.attention = AbstractorAttention(d, heads, queries, grid)
    self.output = AbstractorOutput(d, inner, eps)
    self.norm1, self.normk = nn.LayerNorm(d), nn.LayerNorm(d)

  def forward(self, hidden_states, encoder_hidden_states):
    hidden_states = self.norm1(hidden_states)
    encoder_hidden_states = torch.cat([hidden_states, self.normk(encoder_hidden_states)], dim=1)
    return self.output(self.attention(hidden_states, encoder_hidden_states), hidden_states)


class AbstractorLayer(nn.Module):
  def __init__(self, *args):
    super().__init__()
    self.crossattention = CrossAttention(*args)


class AbstractorEncoder(nn.Module):
  def __init__(self, n, *args):
    super().__init__()
    self.layers = nn.ModuleList(AbstractorLayer(*args) for _ in range(n))


class Abstractor(nn.Module):
  def __init__(self, d, heads, inner, eps, queries, grid, layers, lm_hidden):
    super().__init__()
    self.encoder = AbstractorEncoder(layers, d, heads, inner, eps, queries, grid)
    self.visual_fc = nn.Linear(d, lm_hidden)
    self.query_embeds = nn.Parameter(torch.randn(1, queries, d))
    self.vit_eos = nn.Parameter(torch.randn(1, 1, lm_hidden))

  def forward(self, encoder_hidden_states):
    x = self.query_embeds.repeat(encoder_hidden_states.shape[0], 1, 1)
    for layer in self.encoder.layers:
      x = layer.crossattention(x, encoder_hidden_states)
    x = self.visual_fc(x)
    return torch.cat([x, self.vit_eos.repeat(x.shape[0], 1, 1)], dim=1)


class RMSNorm(nn.Module):
  def __init__(self, d, eps):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

  def forward(self, x):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


class Multiway(nn.Module):
  """MultiwayNetwork: each token through multiway[its modality]."""

  def __init__(self, make):
    super().__init__()
    self.multiway = nn.ModuleList([make(), make()])

  def forward(self, x, indicators):
    out = torch.empty_like(x)
    for idx, sub in enumerate(self.multiway):
      where = indicators.eq(idx).nonzero(as_tuple=True)
      if where[0].numel():
        out[where] = sub(x[where].unsqueeze(1)).squeeze(1)
    return out


def rotate_half(x):
  a, b = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
  return torch.cat((-b, a), dim=-1)


class DecoderLayer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d, self.heads = cfg['hidden_size'], cfg['num_attention_heads']
    self.self_attn = nn.Module()
    self.self_attn.q_proj = nn.Linear(d, d, bias=False)
    self.self_attn.k_proj = Multiway(lambda: nn.Linear(d, d, bias=False))
    self.self_attn.v_proj = Multiway(lambda: nn.Linear(d, d, bias=False))
    self.self_attn.o_proj = nn.Linear(d, d, bias=False)
    self.mlp = nn.Module()
    self.mlp.gate_proj = nn.Linear(d, cfg['intermediate_size'], bias=False)
    self.mlp.up_proj = nn.Linear(d, cfg['intermediate_size'], bias=False)
    self.mlp.down_proj = nn.Linear(cfg['intermediate_size'], d, bias=False)
    self.input_layernorm = Multiway(lambda: RMSNorm(d, cfg['rms_norm_eps']))
    self.post_attention_layernorm = Multiway(lambda: RMSNorm(d, cfg['rms_norm_eps']))
    self.theta = cfg.get('rope_theta', 10000.0)

  def forward(self, x, ind):
    b, n, d = x.shape
    hd = d // self.heads
    h = self.input_layernorm(x, ind)
    split = lambda t: t.view(b, n, self.heads, hd).transpose(1, 2)
    q, k, v = split(self.self_attn.q_proj(h)), split(self.self_attn.k_proj(h, ind)), split(self.self_attn.v_proj(h, ind))
    inv = 1.0 / (self.theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    scores = (q @ k.transpose(2, 3)) / math.sqrt(hd)
    scores = scores + torch.full((n, n), float('-inf')).triu(1)
    att = (scores.float().softmax(-1).to(q.dtype) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + self.self_attn.o_proj(att)
    h = self.post_attention_layernorm(x, ind)
    return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class QAlign(nn.Module):
  """one-align's module tree: model.vision_model (transformers CLIP, saved in mPLUG names), model.visual_abstractor,
  model.embed_tokens, model.layers, model.norm, lm_head."""

  def __init__(self, cfg):
    super().__init__()
    vis, ab = cfg['visual_config']['visual_model'], cfg['visual_config']['visual_abstractor']
    self.cfg = cfg
    self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=vis['hidden_size'], intermediate_size=vis['intermediate_size'],
        num_attention_heads=vis['num_attention_heads'], num_hidden_layers=vis['num_hidden_layers'],
        image_size=vis['image_size'], patch_size=vis['patch_size'], layer_norm_eps=vis['layer_norm_eps'],
        hidden_act='quick_gelu')).eval()
    self.visual_abstractor = Abstractor(ab['hidden_size'], ab['num_attention_heads'], ab['intermediate_size'],
                                        ab['layer_norm_eps'], ab['num_learnable_queries'],
                                        vis['image_size'] // vis['patch_size'], ab['num_hidden_layers'],
                                        cfg['hidden_size'])
    self.embed_tokens = nn.Embedding(cfg['vocab_size'], cfg['hidden_size'])
    self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg['num_hidden_layers']))
    self.norm = RMSNorm(cfg['hidden_size'], cfg['rms_norm_eps'])
    self.lm_head = nn.Linear(cfg['hidden_size'], cfg['vocab_size'], bias=False)

  def vision(self, pixels):
    out = self.clip(pixel_values=pixels).last_hidden_state
    return self._tower().post_layernorm(out)  # mPLUG-Owl: the final LayerNorm on every token

  def _tower(self):
    return getattr(self.clip, 'vision_model', self.clip)  # transformers 5 has no vision_model wrapper

  def encode_images(self, pixels):
    return self.visual_abstractor(self.vision(pixels))

  def forward(self, before, frames, after):
    """ids before / after the image slot, one window's frames (T, 3, H, W) -> the last position's logits."""
    feats = self.encode_images(frames).flatten(0, 1)
    x = torch.cat([self.embed_tokens(torch.tensor(before)), feats, self.embed_tokens(torch.tensor(after))])[None]
    ind = torch.cat([torch.zeros(len(before)), torch.ones(len(feats)), torch.zeros(len(after))]).long()[None]
    for layer in self.layers:
      x = layer(x, ind)
    return self.lm_head(self.norm(x))[0, -1]

  def one_align_state_dict(self):
    """The state dict under one-align's names (q / k / v packed per head into query_key_value)."""
    out = {}
    vm = self._tower()
    heads = self.cfg['visual_config']['visual_model']['num_attention_heads']
    out['model.vision_model.embeddings.patch_embed.weight'] = vm.embeddings.patch_embedding.weight
    out['model.vision_model.embeddings.cls_token'] = vm.embeddings.class_embedding.reshape(1, 1, -1)
    out['model.vision_model.embeddings.position_embedding'] = vm.embeddings.position_embedding.weight[None]
    for n in ('weight', 'bias'):
      out[f'model.vision_model.embeddings.pre_layernorm.{n}'] = getattr(vm.pre_layrnorm, n)
      out[f'model.vision_model.post_layernorm.{n}'] = getattr(vm.post_layernorm, n)
    for i, layer in enumerate(vm.encoder.layers):
      p = f'model.vision_model.encoder.layers.{i}.'
      a = layer.self_attn
      for n in ('weight', 'bias'):
        qkv = [getattr(m, n) for m in (a.q_proj, a.k_proj, a.v_proj)]
        per_head = torch.stack([t.reshape((heads, -1) + t.shape[1:]) for t in qkv], dim=1)  # (heads, 3, hd, ...)
        out[p + f'self_attn.query_key_value.{n}'] = per_head.reshape((-1,) + qkv[0].shape[1:])
        out[p + f'self_attn.dense.{n}'] = getattr(a.out_proj, n)
        out[p + f'input_layernorm.{n}'] = getattr(layer.layer_norm1, n)
        out[p + f'post_attention_layernorm.{n}'] = getattr(layer.layer_norm2, n)
        out[p + f'mlp.fc1.{n}'] = getattr(layer.mlp.fc1, n)
        out[p + f'mlp.fc2.{n}'] = getattr(layer.mlp.fc2, n)
    for k, v in self.state_dict().items():
      if not k.startswith('clip.'):
        out[k if k.startswith('lm_head') else 'model.' + k] = v
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def randomise(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or 'layrnorm' in name or 'ffn_ln' in name or 'layer_norm' in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1))
  return model.eval()
