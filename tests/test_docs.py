"""Every command in README.md and docs/ runs as written, the README stays a manual, and every link resolves.

Commands are taken from fenced bash blocks (continuations joined, comments dropped) and from inline code spans
that start with `python`. Each runs in a subprocess with its own dry run: `--dry_run` for the package's entry
points (`kaleido_jax.main`, `kaleido_jax.tools.aot`, `kaleido_jax.convert`) and the TPU launcher: the config file
loads, every override names a known key of the right type, every flag exists; nothing is trained or written.
A `bench/` script is run with `--help` (argparse or absl), and every flag the command passes must be one its help lists. `pip`
and `pytest` commands are the set-up commands CI itself runs.
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
README_MAX_LINES = 350
ENTRY_POINTS = ('kaleido_jax.main', 'kaleido_jax.tools.aot', 'kaleido_jax.convert')


def _text(doc: str) -> str:
  with open(os.path.join(ROOT, doc)) as f:
    return f.read()


def _commands(doc: str) -> list[str]:
  text = _text(doc)
  out = []
  for lang, block in re.findall(r'```(\w*)\n(.*?)```', text, re.S):
    if lang not in ('bash', 'sh', 'shell'):
      continue
    for line in block.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      if words:
        out.append(shlex.join(words))
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  for span in re.findall(r'`([^`]+)`', prose):
    words = shlex.split(span.replace('\n', ' '))
    while words and re.fullmatch(r'[A-Z_]+=\S*', words[0]):
      words = words[1:]
    if words[:1] == ['python'] and len(words) > 1:
      out.append(shlex.join(shlex.split(span.replace('\n', ' '))))
  return out


def _cases():
  cases = []
  for doc in DOCS:
    for cmd in _commands(doc):
      for part in cmd.split(' && '):
        cases.append(pytest.param(doc, part, id=f'{doc}:{part[:70]}'))
  return cases


def _run(argv, env):
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize('doc,command', _cases())
def test_command_runs_as_written(doc, command):
  words = shlex.split(command)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  while re.fullmatch(r'[A-Z_]+=\S*', words[0]):
    key, value = words.pop(0).split('=', 1)
    env[key] = value
  if words[0] == 'pip' or words[:3] == ['python', '-m', 'pytest']:
    return  # the README's set-up commands: CI runs them as written (.ci/run)
  if words[0] in ('tensorboard', 'gcloud'):
    return  # other programs
  assert words[0] == 'python', f'{doc}: {command!r} is not a python command'
  argv = [sys.executable] + words[1:]
  if words[1] == '-m':
    assert words[2] in ENTRY_POINTS, f'{doc}: unknown entry point in {command!r}'
    p = _run(argv + ['--dry_run'], env)
    assert p.returncode == 0 and 'dry run:' in p.stdout, f'{doc}: {command!r}\n{p.stdout[-2000:]}{p.stderr[-2000:]}'
  elif words[1] == 'launch/tpu.py':
    cut = argv.index('--') if '--' in argv else len(argv)
    p = _run(argv[:cut] + ['--dry_run'] + argv[cut:], env)
    assert p.returncode == 0 and 'gcloud' in p.stdout, f'{doc}: {command!r}\n{p.stderr[-2000:]}'
  elif words[1].startswith('bench/'):
    p = _run([sys.executable, words[1], '--help'], env)
    # argparse's --help exits 0, absl's 1; both print the flags on stdout
    assert p.returncode in (0, 1) and '--help' in p.stdout, f'{doc}: {command!r}\n{p.stderr[-2000:]}'
    for flag in (w.split('=')[0] for w in words[2:] if w.startswith('--')):
      if not flag.startswith('--config.'):
        assert re.search(re.escape(flag) + r'\b', p.stdout), f'{doc}: {command!r}: {words[1]} has no {flag}'
  else:
    pytest.fail(f'{doc}: no dry run for {command!r}')


def test_readme_is_a_manual():
  lines = _text('README.md').splitlines()
  assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines; move detail to docs/'


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@pytest.mark.parametrize('doc', DOCS)
def test_links_resolve(doc):
  text = _text(doc)
  for target in re.findall(r'\]\(([^)\s]+)\)', re.sub(r'```.*?```', '', text, flags=re.S)):
    if re.match(r'[a-z]+://', target):
      continue
    path, _, anchor = target.partition('#')
    file = os.path.normpath(os.path.join(os.path.dirname(os.path.join(ROOT, doc)), path)) if path else \
        os.path.join(ROOT, doc)
    assert os.path.exists(file), f'{doc}: link to missing {target}'
    if anchor:
      headings = re.findall(r'^#+ (.*)$', re.sub(r'```.*?```', '', open(file).read(), flags=re.S), re.M)
      assert anchor in {_anchor(h) for h in headings}, f'{doc}: no heading for #{anchor} in {path or doc}'


def test_vs_maxdiffusion_dry_run_checks_the_checkout_and_prints_the_plan(tmp_path):
  # bench/vs_maxdiffusion.py needs a maxdiffusion checkout and the packages its imports need; its dry run checks
  # both and prints what it would compile, compiling nothing. A wrong directory is one line, exit 2.
  script = [sys.executable, 'bench/vs_maxdiffusion.py']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = _run(script + ['--dry_run', f'--maxdiffusion_dir={tmp_path}'], env)
  assert p.returncode == 2 and p.stdout.startswith('error: ') and 'not a maxdiffusion checkout' in p.stdout
  checkout, deps = tmp_path / 'maxdiffusion', tmp_path / 'deps'
  (checkout / 'src' / 'maxdiffusion' / 'configs').mkdir(parents=True)
  (checkout / 'src' / 'maxdiffusion' / 'configs' / 'base_wan_14b.yml').write_text('')
  p = _run(script + ['--dry_run', f'--maxdiffusion_dir={checkout}', f'--maxdiffusion_deps={deps}'], env)
  assert p.returncode == 2 and 'pip install --no-deps --target' in p.stdout and 'aqt' in p.stdout
  for name in ('aqt', 'chex', 'tensorboardX', 'jaxopt', 'toolz'):
    (deps / name).mkdir(parents=True)
  p = _run(script + ['--dry_run', f'--maxdiffusion_dir={checkout}', f'--maxdiffusion_deps={deps}'], env)
  assert p.returncode == 0, p.stdout + p.stderr
  assert 'would compile:' in p.stdout and 'train_720p_v5p8' in p.stdout and 'denoise_480p_v6e8' in p.stdout
  assert 'ici_context_parallelism=4' in p.stdout and 'compile_s' not in p.stdout
  p = _run(script + ['--dry_run', '--rows=train_1080p', f'--maxdiffusion_dir={checkout}'], env)
  assert p.returncode == 2 and 'unknown' in p.stdout
