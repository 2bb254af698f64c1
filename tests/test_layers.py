"""No module imports one above it: the layers of palr_jax/, checked on every module's imports (ast).

A module may import the modules of lower layers and those of its own unit (a package, or a module, named
in the table); never a higher layer, nor a unit beside it in its own layer (data, retrieval and model
know nothing of each other). Imports inside functions count: a late import is still an import. A new
module must be placed in the table, so the layering is decided, not drifted into.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'palr_jax'

# Lowest first: (layer, its units). A unit is a module or a package; the longest matching name wins.
LAYERS = (
    ('workdir files', ('palr_jax.files',)),
    ('foundation', ('palr_jax.batching', 'palr_jax.defaults', 'palr_jax.distributed', 'palr_jax.fingerprint',
                    'palr_jax.lock', 'palr_jax.memory', 'palr_jax.metrics', 'palr_jax.precision', 'palr_jax.rng',
                    'palr_jax.score_head', 'palr_jax.sharding', 'palr_jax.variants')),
    ('libraries', ('palr_jax.data', 'palr_jax.retrieval', 'palr_jax.model')),
    ('model files', ('palr_jax.hub',)),
    ('training', ('palr_jax.train',)),
    ('inference', ('palr_jax.adapters',)),
    ('export', ('palr_jax.exporter',)),
    ('stage declaration', ('palr_jax.stages.base',)),
    ('stages', ('palr_jax.stages',)),
    ('runner', ('palr_jax.runner',)),
    ('config checks', ('palr_jax.validate',)),
    ('program start', ('palr_jax.cli',)),
    ('the job', ('palr_jax.main',)),
    ('sweeps', ('palr_jax.sweep',)),
    ('tools', ('palr_jax.tools',)),
)


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(name: str, source: str, known: set[str], packages: set[str]) -> set[str]:
  """The palr_jax modules `source` (module `name`) imports, anywhere in it; `from p import m` names p.m
  when that is a module."""
  package = name if name in packages else name.rsplit('.', 1)[0]
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split('.')[0] == 'palr_jax'}
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ''
      if node.level:  # relative: from `name`'s package, one level up per extra dot
        parts = package.split('.')
        module = '.'.join(parts[:len(parts) - node.level + 1] + ([module] if module else []))
      if module.split('.')[0] != 'palr_jax':
        continue
      for a in node.names:
        full = f'{module}.{a.name}'
        out.add(full if full in known else module)
  return out


def place(name: str) -> tuple[int, str] | None:
  """(layer index, unit) of a module, or None when the table does not place it."""
  best = None
  for i, (_, units) in enumerate(LAYERS):
    for unit in units:
      if (name == unit or name.startswith(unit + '.')) and (best is None or len(unit) > len(best[1])):
        best = (i, unit)
  return best


def violations(sources: dict[str, str]) -> list[str]:
  """Every import that goes up a layer or sideways to another unit, and every module the table does not
  place; package roots (`palr_jax`, `palr_jax.data`: empty __init__ files) need no place."""
  known = set(sources)
  packages = {k.rsplit('.', 1)[0] for k in known if '.' in k}
  out = []
  for name, source in sorted(sources.items()):
    here = place(name)
    if here is None:
      if name not in packages or source.strip():
        out.append(f'{name}: not in the layer table (tests/test_layers.py LAYERS)')
      continue
    for dep in sorted(imports(name, source, known, packages)):
      there = place(dep)
      if there is None:
        continue  # the package root, or a module reported as unplaced where it is defined
      if there[0] > here[0]:
        out.append(f'{name} ({LAYERS[here[0]][0]}) imports {dep} ({LAYERS[there[0]][0]}), a layer above')
      elif there[0] == here[0] and there[1] != here[1]:
        out.append(f'{name} imports {dep}: both {LAYERS[here[0]][0]}, different units ({here[1]}, {there[1]})')
  return out


def package_sources() -> dict[str, str]:
  return {module_name(p, ROOT): p.read_text() for p in ROOT.rglob('*.py')}


def test_no_module_imports_one_above_it():
  sources = package_sources()
  assert len(sources) > 40 and 'palr_jax.runner' in sources
  assert violations(sources) == []


def test_every_layer_unit_exists():
  """A unit left in the table after its module moved would place nothing; the table must name real code."""
  sources = package_sources()
  for layer, units in LAYERS:
    for unit in units:
      assert any(m == unit or m.startswith(unit + '.') for m in sources), (layer, unit)


def test_the_checker_finds_upward_sideways_and_unplaced_imports():
  """Planted cases: the checker is not vacuous."""
  fake = {
      'palr_jax': '',
      'palr_jax.stages': '',
      'palr_jax.model': '',
      'palr_jax.data': '',
      'palr_jax.files': '',
      'palr_jax.runner': 'from palr_jax.stages import base\n',
      'palr_jax.stages.base': '',
      'palr_jax.stages.rank': 'from palr_jax import runner\nfrom palr_jax.stages import base\n',
      'palr_jax.stages.report': 'def f():\n  from palr_jax import validate\n',  # a late import counts
      'palr_jax.validate': 'from palr_jax.data import prompts\nfrom palr_jax import files\n',
      'palr_jax.model.llama': 'import palr_jax.stages.rank\n',
      'palr_jax.model.lora': 'from . import llama\nfrom ..data import prompts\n',  # relative, sideways
      'palr_jax.data.prompts': 'from palr_jax import files\n',
      'palr_jax.newthing': 'from palr_jax import files\n',
  }
  assert violations(fake) == [
      'palr_jax.model.llama (libraries) imports palr_jax.stages.rank (stages), a layer above',
      'palr_jax.model.lora imports palr_jax.data.prompts: both libraries, different units '
      '(palr_jax.model, palr_jax.data)',
      'palr_jax.newthing: not in the layer table (tests/test_layers.py LAYERS)',
      'palr_jax.stages.rank (stages) imports palr_jax.runner (runner), a layer above',
      'palr_jax.stages.report (stages) imports palr_jax.validate (config checks), a layer above',
  ]
  # What the layering allows: down a layer, and within a unit.
  assert violations({k: v for k, v in fake.items() if k in (
      'palr_jax', 'palr_jax.stages', 'palr_jax.data', 'palr_jax.files', 'palr_jax.runner', 'palr_jax.stages.base',
      'palr_jax.validate', 'palr_jax.data.prompts')}) == []
