"""FaceSim-Cur's IR backbone in JAX against a PyTorch IR network with the benchmark's (TFace's) layout and key
names, on random weights and random BatchNorm statistics; its `.bin` (torch.save of the state dict) loads as is."""

import numpy as np
import pytest

from kaleido_jax.eval import curricularface
from kaleido_jax.eval import facesim

torch = pytest.importorskip('torch')
nn = torch.nn


class _Unit(nn.Module):
  """An IR unit as TFace's BasicBlockIR lays it out (written here from the architecture, not imported)."""

  def __init__(self, cin, depth, stride):
    super().__init__()
    self.shortcut_layer = (nn.MaxPool2d(1, stride) if cin == depth else
                           nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)))
    self.res_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(depth), nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1,
                                                                                     bias=False),
                                   nn.BatchNorm2d(depth))

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class _IR(nn.Module):
  def __init__(self, stages):
    super().__init__()
    self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
    units, cin = [], 64
    for n, depth in zip(stages, (64, 128, 256, 512)):
      for i in range(n):
        units.append(_Unit(cin, depth, 2 if i == 0 else 1))
        cin = depth
    self.body = nn.Sequential(*units)
    self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(),
                                      nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512, affine=False))

  def forward(self, x):
    return self.output_layer(self.body(self.input_layer(x)))


def _random(stages, seed):
  torch.manual_seed(seed)
  model = _IR(stages).eval()
  with torch.no_grad():  # trained-looking statistics: BatchNorm and PReLU away from their initial values
    for m in model.modules():
      if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
        if m.affine:
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0, 0.1)
      elif isinstance(m, nn.PReLU):
        m.weight.uniform_(0.0, 0.5)
  return model


@pytest.mark.parametrize('num_layers', [18, pytest.param(100, marks=pytest.mark.slow)])
def test_the_ir_backbone_matches_pytorch_and_loads_the_bin(tmp_path, num_layers):
  model = _random(curricularface.STAGES[num_layers], seed=num_layers)
  path = tmp_path / 'glint360k_curricular_face_r101_backbone.bin'
  torch.save(model.state_dict(), path)
  ours = curricularface.load(str(path))
  assert len(ours.units) == sum(curricularface.STAGES[num_layers])
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 112, 112, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(ours(x))
  # fp32: within 1e-5 of the output's scale (measured 2.1e-6 for IR-18, 1.9e-6 for IR-101).
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
  # The benchmark's inference: a uint8 face crop resized to 112 (cv2 bilinear), [-1, 1], unit norm.
  cv2 = pytest.importorskip('cv2')
  faces = np.random.default_rng(1).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
  e = facesim.CurricularFaceEmbedder(ours)(faces)
  small = np.stack([cv2.resize(f, (112, 112)) for f in faces]).transpose(0, 3, 1, 2)
  with torch.no_grad():
    want = model(torch.from_numpy(small).float().div(255).sub(0.5).div(0.5)).numpy()
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  assert e.shape == (2, 512) and np.abs(e - want).max() <= 1e-5, np.abs(e - want).max()


def test_a_bin_of_another_network_is_refused_by_name(tmp_path):
  torch.save({'body.0.res_layer.0.weight': torch.zeros(3), 'extra.weight': torch.zeros(2)}, tmp_path / 'x.bin')
  with pytest.raises(ValueError, match='IR units'):
    curricularface.load(str(tmp_path / 'x.bin'))
