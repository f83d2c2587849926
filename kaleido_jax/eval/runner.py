"""`--mode eval`: generate videos for held-out synthetic reference sets and score them offline.

Requests come from the synthetic set's 'heldout' split (identities never seen in training): for each of the
first `eval.num_videos` clips, its caption as the prompt and one cross-paired reference per subject (a cut-out
from *another* clip of that identity). Each generator (the model through kaleido_jax.pipeline, or an exported
artifact through kaleido_jax.exported when `eval.exported` is set) makes one video per request, seed
`sample.seed + i`. The real held-out clip is scored the same way as a ceiling row ("target clips").
`--config.data.synthetic_seed=S` evaluates on another seed's held-out identities (the tokenizer stays the
workdir's): identities that look like one the checkpoint was trained on (its config's seed) are left out.

Writes `eval.json` (per-video rows and means per generator), `eval.md` (the markdown table) and GIF/PNG
strips (references | each generator | target) for the first `eval.save_videos` requests under
`eval.output_dir` (default WORKDIR/eval). Metrics: kaleido_jax/eval/metrics.py (fidelity per scorer, lower
is better; copy-paste rate, subject presence and its per-video minimum, binding error, background leakage,
pose-copy rate and motion adherence from the synthetic truth, temporal smoothness).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from kaleido_jax import storage
from kaleido_jax import media
from kaleido_jax import batch
from kaleido_jax.data import synthetic
from kaleido_jax.data import references as refs_lib
from kaleido_jax.data import video as video_lib
from kaleido_jax.diffusion import guidance
from kaleido_jax.eval import metrics

Generator = Callable[[Sequence[dict[str, Any]], Sequence[int]], np.ndarray]
TARGET = 'target clips (ceiling)'


def heldout_requests(config: ml_collections.ConfigDict, num_videos: int,
                     trained_seed: int | None = None) -> list[dict[str, Any]]:
  """prompt, refs (k, H, W, 3) uint8 (one cross-paired cut-out per subject, k <= max_refs), target clip, truth.

  `trained_seed`: the content seed the model was trained on, when it differs from `data.synthetic_seed`: the
  other seed's held-out identities that look like a training identity of that seed are left out.
  """
  source = synthetic.make_source(config.data, 'heldout', exclude_seed=trained_seed)
  if num_videos > len(source):
    raise ValueError(f'eval.num_videos={num_videos} but the held-out split has {len(source)} clips '
                     '(data.heldout_clips)')
  out = []
  for i in range(num_videos):
    rec = source[i]
    slots = np.asarray(rec['ref_slots'])
    picks = [int(np.nonzero(slots == s)[0][0]) for s in range(len(rec['subject_ids']))][:config.model.max_refs]
    truth = synthetic.clip_truth(source.set, i)
    truth['masks'], truth['poses'] = truth['masks'][:, :len(picks)], truth['poses'][:, :len(picks)]
    truth['motions'] = truth['motions'][:len(picks)]
    # The world's per-clip looks (data.clip_nuisance): what pasting each reference's look would make of the clip.
    truth.update(synthetic.pasted_look(source.set, i, [int(rec['ref_clip_ids'][p]) for p in picks]))
    out.append(dict(prompt=str(rec['caption']), refs=np.asarray(rec['refs'])[picks],
                    target=np.asarray(rec['video']), clip=int(rec['clip_id']), truth=truth))
  return out


def pipeline_generator(pipe: Any) -> Generator:
  d = pipe.config.data

  def generate(requests, seeds):
    frames = pipe.generate([list(r['refs']) for r in requests], [r['prompt'] for r in requests],
                           num_frames=d.num_frames, height=d.height, width=d.width, seed=list(seeds))
    return frames, pipe.last_stats['model_calls']
  return generate


def exported_generator(sampler: Any) -> Generator:
  s = sampler.signature['sample']
  # The exported program runs the plain sampler: every step, every guidance branch.
  calls = len(s.get('timesteps') or ()) or int(s['num_steps'])
  calls *= guidance.num_branches(float(s['guidance_scale']), float(s.get('image_guidance_scale', 0.0)))

  def generate(requests, seeds):
    return sampler([r['prompt'] for r in requests], [list(r['refs']) for r in requests], seeds=list(seeds)), calls
  return generate


def _as_float(frames: np.ndarray) -> np.ndarray:
  return np.asarray(frames, np.float32) / 127.5 - 1.0


def trained_seed(workdir: str) -> int | None:
  """data.synthetic_seed of the newest checkpoint's config under WORKDIR/checkpoints (None: none there)."""
  root = storage.join(workdir, 'checkpoints')
  steps = sorted((int(d) for d in storage.listdir(root) if d.isdigit()), reverse=True)
  for step in steps:
    path = storage.join(root, str(step), 'config', 'metadata')
    if storage.exists(path):
      return int(storage.read_json(path).get('data', {}).get('synthetic_seed', 0))
  return None


def evaluate(config: ml_collections.ConfigDict, generators: Mapping[str, Generator], output_dir: str, *,
             requests: Sequence[dict[str, Any]] | None = None, exclude_seed: int | None = None) -> dict[str, Any]:
  """Generate with every generator, score, write eval.json / eval.md / strips; returns the results dict."""
  e = config.eval
  requests = list(requests if requests is not None else heldout_requests(config, int(e.num_videos), exclude_seed))
  scorers = tuple(e.scorers)
  videos: dict[str, np.ndarray] = {}
  calls: dict[str, list[float]] = {}
  for name, gen in generators.items():
    parts = []
    for start in range(0, len(requests), int(e.batch_size)):
      batch = requests[start:start + int(e.batch_size)]
      out = gen(batch, [int(config.sample.seed) + start + k for k in range(len(batch))])
      if isinstance(out, tuple):  # (frames, DiT calls per video)
        out, n = out
        calls.setdefault(name, []).extend([float(n)] * len(batch))
      parts.append(np.asarray(out))
    videos[name] = np.concatenate(parts)
  videos[TARGET] = np.stack([r['target'] for r in requests])
  rows, subjects = {}, {}
  for name, vids in videos.items():
    rows[name], subjects[name] = [], []
    for v, r in zip(vids, requests):
      per = []
      rows[name].append(metrics.evaluate_video(_as_float(v), r['refs'], truth=r.get('truth'), scorers=scorers,
                                               subjects=per))
      subjects[name].append(per)
  means = {name: metrics.aggregate(r) for name, r in rows.items()}
  for name, n in calls.items():
    means[name][metrics.MODEL_CALLS] = float(np.mean(n))
  table = metrics.markdown_table(means)
  by_subject = {f'{name} · subject {k + 1}': metrics.aggregate([per[k] for per in subjects[name] if len(per) > k])
                for name in subjects for k in range(max(len(p) for p in subjects[name]))}
  subject_table = metrics.markdown_table(by_subject)
  storage.path(output_dir).mkdir(parents=True, exist_ok=True)
  results = {'num_videos': len(requests), 'synthetic_seed': int(config.data.synthetic_seed),
             'trained_seed': exclude_seed, 'scorers': list(scorers), 'means': means, 'per_video': rows,
             'per_subject': subjects, 'subject_means': by_subject,
             'prompts': [r['prompt'] for r in requests], 'clips': [r['clip'] for r in requests]}
  with media.atomic_path(storage.join(output_dir, 'eval.json')) as tmp, open(tmp, 'w') as fh:
    json.dump(results, fh, indent=2)
  note = ('Held-out identities, cross-paired references. fidelity_* are distances between the best-matching '
          'window of each frame and the reference subject (lower is better); copy_paste_rate is the fraction '
          'of reference pixels reappearing unchanged; subject_presence the fraction of frames where the '
          'subject is found; frame_diff_* / flicker measure temporal change; model_calls_per_video counts DiT '
          'passes (each guidance branch one; a cached step none). subject_presence_min is the presence of each video\'s '
          'least present subject; binding_error the share of (frame, subject) pairs matching another reference '
          'better than their own; background_leakage the share of the references\' white surround found in the '
          'video; pose_copy_rate the share of (frame, subject) pairs showing the reference\'s own pose rather '
          'than the prompted one; motion_adherence the share of subjects whose tracked path follows the prompted '
          'motion (of the share motion_judged whose real motion the tracker recovers).')
  with media.atomic_path(storage.join(output_dir, 'eval.md')) as tmp, open(tmp, 'w') as fh:
    fh.write(f'# Evaluation: {len(requests)} videos\n\n{note}\n\n{table}\n\n## Per subject (k-th subject of '
             f'each video that has one)\n\n{subject_table}\n')
  scale = max(1, 128 // max(int(config.data.height), 1))
  for i, r in enumerate(requests[:int(e.save_videos)]):
    rows_img = [media.upscale(r['refs'], scale)] + [media.upscale(videos[n][i], scale) for n in videos]
    media.write_image(storage.join(output_dir, f'video_{i:02d}.png'), media.strip(rows_img))
    media.write_video(storage.join(output_dir, f'video_{i:02d}.gif'),
                      np.concatenate([media.upscale(videos[n][i], scale) for n in videos], axis=2),
                      float(config.sample.fps))
  results['table'] = table
  return results


def score_samples(config: ml_collections.ConfigDict, samples_dir: str, output_dir: str) -> dict[str, Any]:
  """Scores a `--mode sample --prompts` output directory (kaleido_jax/batch.py): every done video of its
  manifest against its own reference images (fitted on white at the video's size). No ground truth: the
  metrics that need the synthetic truth (pose copy, motion adherence) and the target row are absent."""
  path = storage.join(samples_dir, batch.MANIFEST)
  if not storage.exists(path):
    raise FileNotFoundError(f'eval.samples_dir={samples_dir!r} has no {batch.MANIFEST}: give the --out directory '
                            'of a `--mode sample --prompts` run')
  entries = [r for r in storage.read_json(path)['requests'] if r['status'] == 'done']
  rows = []
  for r in entries:
    frames = video_lib.decode(storage.join(samples_dir, r['file'])).frames
    h, w = frames.shape[1:3]
    refs = [np.round((refs_lib.load_reference(p, h, w) + 1.0) * 127.5).astype(np.uint8) for p in r['refs']]
    row = metrics.evaluate_video(_as_float(frames), np.stack(refs) if refs else np.zeros((0, h, w, 3), np.uint8),
                                 scorers=tuple(config.eval.scorers))
    rows.append({'name': r['name'], **row})
  name = f'samples ({storage.path(samples_dir).name})'
  means = {name: metrics.aggregate([{k: v for k, v in row.items() if k != 'name'} for row in rows])}
  table = metrics.markdown_table(means)
  storage.path(output_dir).mkdir(parents=True, exist_ok=True)
  samples = storage.absolute(samples_dir)
  results = {'samples_dir': samples, 'num_videos': len(rows), 'scorers': list(config.eval.scorers),
             'means': means, 'per_video': rows, 'table': table}
  with media.atomic_path(storage.join(output_dir, 'eval.json')) as tmp, open(tmp, 'w') as fh:
    json.dump(results, fh, indent=2)
  with media.atomic_path(storage.join(output_dir, 'eval.md')) as tmp, open(tmp, 'w') as fh:
    fh.write(f'# Evaluation of {samples_dir}: {len(rows)} videos against their references\n\n{table}\n')
  return results
