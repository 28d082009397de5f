"""configs/optsar_rsvg_reference.py differs from configs/optsar_rsvg.py in exactly the keys of the deviation
table of docs/architecture.md (section 10), with the table's values on each side."""

import ast
import os
import re

import pytest

from optisar_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'architecture.md')


def deviation_table() -> dict[str, tuple[object, object]]:
  """{key: (our default, reference)} parsed from the table under '## 10. Deviations'."""
  with open(DOC) as f:
    text = f.read()
  section = re.search(r'^## 10\. Deviations.*?(?=^## |\Z)', text, re.M | re.S)
  assert section, 'docs/architecture.md has no section "## 10. Deviations"'
  rows = {}
  for line in section.group(0).splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) < 3 or not cells[0].startswith('`'):
      continue
    key, ours, reference = (c.strip('`') for c in cells[:3])
    assert key not in rows, f'{key} is listed twice'
    rows[key] = (ast.literal_eval(ours), ast.literal_eval(reference))
  return rows


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      out.update(_flat(value, name + '.'))
    else:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def test_the_table_is_parsed():
  table = deviation_table()
  assert len(table) >= 5
  assert table['model.tgdg.gate_init'] == ((1.0, 0.0), (0.0, 0.0))


def test_preset_differs_in_exactly_the_documented_keys():
  default = _flat(load_config('configs/optsar_rsvg.py'))
  preset = _flat(load_config('configs/optsar_rsvg_reference.py'))
  assert set(default) == set(preset)
  differing = {key for key in default if default[key] != preset[key]}
  table = deviation_table()
  assert differing == set(table)
  for key, (ours, reference) in table.items():
    assert default[key] == ours, key
    assert preset[key] == reference, key


@pytest.mark.parametrize('key, value', [('optim.warmup_b1', False), ('optim.eps', 1e-8 / 64),
                                        ('train.eval_last_epochs', 5), ('model.bn_group_size', 8)])
def test_preset_has_the_reference_recipe(key, value):
  assert _flat(load_config('configs/optsar_rsvg_reference.py'))[key] == pytest.approx(value)


def test_preset_model_builds():
  from optisar_jax.grounding import abstract_model
  from optisar_jax.models.summary import count_params
  model = abstract_model(load_config('configs/optsar_rsvg_reference.py'))
  assert model.detector.neck_text == 'refined'
  assert count_params(model.detector) == 28_123_320


def test_ablation_variants_follow_the_table():
  """scripts/ablation.py reverts each documented deviation on its own, plus default and reference."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('ablation', os.path.join(ROOT, 'scripts', 'ablation.py'))
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  table = deviation_table()
  reference = ablation.deviations()
  assert reference == {key: values[1] for key, values in table.items()}
  names = [name for name, _ in ablation.variants(reference)]
  assert names[:2] == ['default', 'reference'] and len(names) == 2 + len(table)
  assert all(len(changes) == 1 for _, changes in ablation.variants(reference)[2:])
