"""sample.layout='auto' (configs/kaleido_14b_sample.py as shipped) on the chips a user samples on: libtpu's abstract
v5e-1, v6e-1, v5p-1, v6e-8 and v5p-8 devices; the mesh it sets builds on them and the request validates."""

import importlib.util

import pytest

from kaleido_jax import pipeline
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.parallel import sampling_layout
from configs import kaleido_14b_sample

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (test extra)')

# topology: (mesh data x context, context_parallel, VAE tile px, umT5 device)
CHIPS = {
    'v5e:1x1': ((1, 1), 'gather', 256, 'host'),      # v5e-1, 16 GiB: a whole 512x896 decode chunk needs 18.1 GiB
    'v6e:1x1': ((1, 1), 'gather', 512, 'host'),      # v6e-1, 32 GiB
    'v5p:1x1x1': ((1, 1), 'gather', None, 'accelerator'),  # v5p-1, 95 GiB: as shipped
    'v6e:2x4': ((2, 4), 'ulysses', 512, 'host'),     # v6e-8: CFG's 2 branches over data, tokens over context 4
    'v5p:2x2x1': ((2, 2), 'ulysses', None, 'accelerator'),  # v5p-8 (4 chips)
}


@pytest.mark.parametrize('topology', sorted(CHIPS))
def test_the_released_sampling_config_fits_its_layout_to_the_chips(topology):
  from kaleido_jax.tools import aot
  devices = aot.topology_devices(topology)
  config = kaleido_14b_sample.get_config()
  assert config.sample.layout == 'auto'
  chosen = sampling_layout.apply(config, devices)
  (data, context), cp, tile, te = CHIPS[topology]
  assert dict(config.mesh) == dict(config.mesh, data=data, fsdp=1, context=context, tensor=1), chosen
  assert config.model.context_parallel == cp and config.vae.tile_size == tile
  assert config.sample.text_encoder_device == te
  mesh = mesh_lib.make_mesh(config.mesh, devices)  # the mesh the run builds there
  assert mesh.devices.size == len(devices)
  s = config.sample
  pipeline.check_request(config, ['a prompt'], [3], s.num_frames, s.height, s.width)


def test_the_layout_stays_the_configs_unless_asked_and_a_bad_one_is_named():
  from kaleido_jax.tools import aot
  config = kaleido_14b_sample.get_config()
  config.sample.layout = 'config'
  before = config.to_dict()
  assert sampling_layout.apply(config, aot.topology_devices('v6e:2x4')) == {}
  assert config.to_dict() == before
  config.sample.layout = 'fast'
  with pytest.raises(ValueError, match="sample.layout='fast'; choose one of"):
    sampling_layout.apply(config, aot.topology_devices('v5e:1x1'))
