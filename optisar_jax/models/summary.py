"""Per-module parameter table of OptiSARNet, built abstractly (nnx.eval_shape: no memory, no FLOPs).

Rows count nnx.Param scalars: BatchNorm running statistics are not parameters. The last line,
`total_params`, follows the reference's convention (PyTorch `sum(p.numel() for p in model.parameters())`
without the unused visual-prompt encoder): trainable parameters plus the reg_max weights of the frozen DFL
projection, which the reference holds as a non-trainable Conv2d and we keep as a constant of the box
decoding (box_ops). For scale m: 28,123,320 trainable + 16 = 28,123,336.
"""

from __future__ import annotations

import math

import jax

from flax import nnx

from optisar_jax.models.detector import LAYER_NAMES, OptiSARNet


def build_abstract_model(config) -> OptiSARNet:
  """The model of `config` with ShapeDtypeStruct leaves (nothing allocated)."""
  return nnx.eval_shape(lambda: OptiSARNet(config.model, int(config.text.dim), rngs=nnx.Rngs(0)))


def count_params(module: nnx.Module) -> int:
  """Number of nnx.Param scalars in `module`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def layer_param_counts(model: OptiSARNet) -> list[int]:
  """Parameter count of each reference layer L0..L23."""
  return [count_params(layer) for layer in model.layers]


def _children(module: nnx.Module):
  for name, value in vars(module).items():
    if isinstance(value, nnx.Module):
      yield name, value
    elif isinstance(value, nnx.List):
      for i, item in enumerate(value):
        if isinstance(item, nnx.Module):
          yield f'{name}[{i}]', item


def summary_rows(model: OptiSARNet, depth: int = 1) -> list[tuple[str, str, int]]:
  """(name, module type, params) rows: one per layer L0..L23, plus `depth` levels of sub-modules."""
  rows = []

  def visit(prefix: str, module: nnx.Module, level: int):
    for name, child in _children(module):
      n = count_params(child)
      if n:
        rows.append(('  ' * level + f'{prefix}.{name}', type(child).__name__, n))
        if level < depth:
          visit(f'{prefix}.{name}', child, level + 1)

  for i, (kind, layer) in enumerate(zip(LAYER_NAMES, model.layers)):
    rows.append((f'L{i}', kind, count_params(layer)))
    if depth > 0:
      visit(f'L{i}', layer, 1)
  return rows


def format_summary(config, depth: int = 1) -> str:
  """The table printed by scripts/model_summary.py; its last line is `total_params N`."""
  model = build_abstract_model(config)
  rows = summary_rows(model, depth)
  width = max(max(len(r[0]) for r in rows), len('layer')) + 2
  lines = [f"scale {config.model.scale}, text_dim {config.text.dim}, compute {config.model.compute_dtype}",
           f"{'layer':<{width}}{'module':<26}{'params':>12}"]
  lines += [f'{name:<{width}}{kind:<26}{n:>12,}' for name, kind, n in rows]
  counts = layer_param_counts(model)
  lines.append(f'backbone L0-L10 {sum(counts[:11]):,} | neck L11-L22 {sum(counts[11:23]):,} | '
               f'head L23 {counts[23]:,}')
  trainable = count_params(model)
  lines.append(f'trainable_params {trainable}')
  lines.append(f'frozen DFL projection (a parameter in the reference, a constant in box_ops): '
               f'{int(config.model.reg_max)}')
  lines.append(f'total_params {trainable + int(config.model.reg_max)}')
  return '\n'.join(lines)


def scales_table_markdown(config, scales=None) -> str:
  """A markdown table of the per-layer parameter counts of `config` at each scale of `model.scales`
  (or of `scales`), the rows L0..L23, then the trainable sum and the reference-convention total
  (+ the reg_max frozen DFL weights); what docs/architecture.md section 3 shows."""
  scales = list(scales or config.model.scales.keys())
  columns = []
  for scale in scales:
    if scale not in config.model.scales:
      raise ValueError(f"config key 'model.scale': {scale!r} is not one of model.scales "
                       f'{sorted(config.model.scales)}')
    scaled = config.copy_and_resolve_references()
    scaled.model.scale = scale
    columns.append(layer_param_counts(build_abstract_model(scaled)))
  lines = ['| layer | module | ' + ' | '.join(scales) + ' |', '|---|---|' + '---:|' * len(scales)]
  for i, kind in enumerate(LAYER_NAMES):
    lines.append(f'| {i} | {kind} | ' + ' | '.join(f'{col[i]:,}' for col in columns) + ' |')
  dfl = int(config.model.reg_max)
  lines.append('| | trainable | ' + ' | '.join(f'{sum(col):,}' for col in columns) + ' |')
  lines.append(f'| | total_params (+{dfl} DFL) | ' + ' | '.join(f'{sum(col) + dfl:,}' for col in columns) + ' |')
  return '\n'.join(lines)
