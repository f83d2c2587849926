"""The house rules, checked on the source: no import cycle, model/ imports nothing else of the package, nothing
imports the entry shim `kaleido_jax.main`, and only cli/ (plus the `__main__` entry files) exits the process.

The graph has an edge for every `import` / `from ... import` of a kaleido_jax module, at module level or inside a
function (a cycle through a function-local import is still a cycle), except inside `if __name__ == '__main__':`
blocks, which run only when a file is executed as a command. Importing `a.b.c` runs the packages `a` and `a.b`
first; like most import-graph tools we do not count that as an edge.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, 'kaleido_jax')


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(d, f)
  return out


def _is_main_guard(node) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and
          isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__')


def _walk(tree):
  """Every node except those under an `if __name__ == ...` guard."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    stack.extend(c for c in ast.iter_child_nodes(node) if not _is_main_guard(c))


def _graph(mods):
  edges = {m: set() for m in mods}
  for m, path in mods.items():
    for node in _walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods else node.module
                 for a in node.names]
      else:
        continue
      edges[m].update(n for n in names if n in mods and n != m)
  return edges


def _cycles(edges):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))
  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


@pytest.fixture(scope='module')
def house():
  mods = _modules()
  return mods, _graph(mods)


def test_no_import_cycle(house):
  _, edges = house
  assert _cycles(edges) == []


def test_model_imports_nothing_else_of_the_package(house):
  _, edges = house
  outside = {m: sorted(n for n in e if not n.startswith('kaleido_jax.model')) for m, e in edges.items()
             if m.startswith('kaleido_jax.model')}
  assert {m: e for m, e in outside.items() if e} == {}


def test_nothing_imports_the_entry_shim(house):
  _, edges = house
  assert [m for m, e in edges.items() if 'kaleido_jax.main' in e] == []


def test_only_the_command_line_exits(house):
  mods, _ = house
  exits = []
  for m, path in mods.items():
    if m.startswith('kaleido_jax.cli') or path.endswith('__main__.py'):
      continue
    for node in _walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'exit' and
          isinstance(node.func.value, ast.Name) and node.func.value.id == 'sys'):
        exits.append(f'{m}:{node.lineno}')
  assert exits == []


def test_every_function_local_import_says_why(house):
  """Imports sit at the top of a module; one inside a function is an optional dependency or an import cost, and
  its line says which (`# lazy: ...`)."""
  mods, _ = house
  unexplained = []
  for m, path in mods.items():
    lines = open(path).read().splitlines()
    tree = ast.parse('\n'.join(lines))
    for fn in (n for n in _walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
      for node in _walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and '# lazy:' not in lines[node.lineno - 1]:
          unexplained.append(f'{m}:{node.lineno}: {lines[node.lineno - 1].strip()}')
  assert unexplained == []
