"""PL-MoE routing made visible: which expert each patch of the backbone's MoE (layer 8,
docs/architecture.md section 5) is sent to, counted per modality (optical vs SAR) and drawn per patch.
The paper's claim is that PL-MoE separates optical and SAR features; these counts and maps show whether a
trained model routes the two domains to different experts.

  routing_maps(grounder, images)       -> {block: (N, nh, nw) int32}, the top-1 expert of every patch
  usage_counts(maps, domains, experts) -> {block: {'optical': [E], 'sar': [E]}}, patches per expert
  routing_figure(...)                  -> PIL image: usage bars per block, then per-patch expert maps
  write_routing(grounder, data, dir)   -> routing.png and routing.json (what `scripts/evaluate.py` writes)

The top-1 expert is the one with the largest gate (the router keeps `model.moe.top_k` experts per patch and
mixes their LoRA deltas; the top-1 one carries the largest share). Every patch is counted once, so a
block's counts of a domain sum to (images of that domain) x (patches per image).
"""

from __future__ import annotations

import io
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from optisar_jax import visualize
from optisar_jax.models.moe import PatchMoE
from optisar_jax.runtime import paths

DOMAIN_NAMES = ('optical', 'sar')
DOMAIN_COLOURS = {'optical': (60, 60, 60), 'sar': (175, 175, 175)}      # greys: the experts have the colours
EXPERT_COLOURS = ((228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0),
                  (255, 255, 51), (166, 86, 40), (247, 129, 191), (153, 153, 153), (0, 206, 209))


def _moe_blocks(model) -> list[tuple[str, PatchMoE]]:
  return [('/'.join(str(p) for p in path), module) for path, module in nnx.iter_modules(model)
          if isinstance(module, PatchMoE)]


def make_routing_fn(eval_graphdef):
  """`routing(params, rest, images uint8 (N,S,S,3)) -> {block path: (N, nh, nw) int32}`: the backbone run
  in eval mode with every PatchMoE recording its patches' top-1 experts."""

  def routing(params, rest, images):
    model = nnx.merge(eval_graphdef, params, rest, copy=True)
    blocks = _moe_blocks(model)
    for _, block in blocks:
      block.record_routing = True
    model.detector.encode_image(images.astype(jnp.float32) / 255.0)
    return {name: block.routing.value[0] if isinstance(block.routing.value, tuple) else block.routing.value
            for name, block in blocks}

  return routing


def routing_maps(grounder, images: np.ndarray) -> dict[str, np.ndarray]:
  """{MoE block path: (N, nh, nw) int32 top-1 expert per patch} of `images` (N,S,S,3) uint8 letterboxed
  canvases, computed with the grounder's weights on its mesh (every process passes the same images and
  gets the same maps)."""
  from optisar_jax.evaluation import place_replicated
  fn = jax.jit(make_routing_fn(grounder.eval_graphdef), out_shardings=grounder.replicated)
  placed = place_replicated(np.ascontiguousarray(images), grounder.mesh)
  out = fn(grounder.params, grounder.rest, placed)
  return {name: np.asarray(value.addressable_shards[0].data) for name, value in sorted(out.items())}


def usage_counts(maps: dict[str, np.ndarray], domains: Sequence[int], num_experts: int) -> dict:
  """{block: {'optical': [patches per expert], 'sar': [...]}} over the images of each domain
  (`domains[i]`: 0 optical, 1 SAR, the dataset's `domain` feature)."""
  domains = np.asarray(domains)
  counts = {}
  for name, grid in maps.items():
    counts[name] = {d: np.bincount(grid[domains == k].reshape(-1), minlength=num_experts).astype(int).tolist()
                    for k, d in enumerate(DOMAIN_NAMES)}
  return counts


def _usage_panel(name: str, counts: dict, width: int = 340, height: int = 170) -> Image.Image:
  font = visualize._font()
  panel = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(panel)
  draw.text((6, 4), f'{name}: share of patches per expert', fill=(0, 0, 0), font=font)
  experts = len(counts['optical'])
  top, bottom, left = 24, height - 20, 30
  draw.line([left, bottom, width - 6, bottom], fill=(0, 0, 0))
  slot = (width - left - 10) / experts
  bar = max(2.0, slot / 2 - 4)
  for e in range(experts):
    x0 = left + e * slot + 2
    for k, domain in enumerate(DOMAIN_NAMES):
      total = sum(counts[domain])
      share = counts[domain][e] / total if total else 0.0
      y = bottom - share * (bottom - top)
      bx = x0 + k * (bar + 2)
      if share > 0:
        draw.rectangle([bx, y, bx + bar, bottom], fill=DOMAIN_COLOURS[domain])
      draw.text((bx, max(top, y - 12)), f'{100 * share:.0f}%', fill=(0, 0, 0), font=font)
    draw.rectangle([x0, bottom + 4, x0 + 8, bottom + 12], fill=EXPERT_COLOURS[e % len(EXPERT_COLOURS)])
    draw.text((x0 + 11, bottom + 2), f'expert {e}', fill=(0, 0, 0), font=font)
  return panel


def _map_tile(canvas: np.ndarray, grid: np.ndarray, label: str, size: int = 128) -> Image.Image:
  """The canvas at `size` px with each patch tinted by its top-1 expert's colour (half opacity)."""
  font = visualize._font()
  image = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR), np.float32)
  nh, nw = grid.shape
  rows = np.minimum((np.arange(size) * nh) // size, nh - 1)
  cols = np.minimum((np.arange(size) * nw) // size, nw - 1)
  palette = np.asarray(EXPERT_COLOURS, np.float32)
  tint = palette[grid[rows][:, cols] % len(EXPERT_COLOURS)]
  blended = (0.5 * image + 0.5 * tint).round().astype(np.uint8)
  tile = Image.new('RGB', (size, size + visualize.LINE_HEIGHT + 4), 'white')
  tile.paste(Image.fromarray(blended), (0, 0))
  ImageDraw.Draw(tile).text((2, size + 2), label, fill=(0, 0, 0), font=font)
  return tile


def routing_figure(counts: dict, maps: dict[str, np.ndarray], canvases: Sequence[np.ndarray],
                   domains: Sequence[int], shown: Sequence[int], *, padding: int = 6) -> Image.Image:
  """Usage bars of every MoE block (optical dark grey, SAR light grey: the share of each domain's patches
  whose top-1 expert is e), then for every block a row of per-patch expert maps of the images `shown`
  (indices into `canvases`/`domains`)."""
  font = visualize._font()
  panels = [_usage_panel(name, counts[name]) for name in maps]
  rows = [[_map_tile(canvases[i], maps[name][i], f'{DOMAIN_NAMES[domains[i]]} #{i}') for i in shown]
          for name in maps]
  width = max([padding + len(panels) * (panels[0].width + padding)]
              + [padding + len(r) * (r[0].width + padding) for r in rows if r])
  header = visualize.LINE_HEIGHT + 8
  height = header + panels[0].height + padding + sum(
      visualize.LINE_HEIGHT + 4 + (r[0].height if r else 0) + padding for r in rows) + padding
  figure = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(figure)
  x = padding
  for domain in DOMAIN_NAMES:
    draw.rectangle([x, 5, x + 10, 15], fill=DOMAIN_COLOURS[domain])
    draw.text((x + 15, 4), 'SAR' if domain == 'sar' else 'optical', fill=(0, 0, 0), font=font)
    x += 15 + int(font.getlength(domain)) + 16
  draw.text((x + 10, 4), 'PL-MoE routing: top-1 expert of each patch', fill=(0, 0, 0), font=font)
  for k, panel in enumerate(panels):
    figure.paste(panel, (padding + k * (panel.width + padding), header))
  y = header + panels[0].height + padding
  for name, row in zip(maps, rows):
    draw.text((padding, y), f'{name}: expert of each patch (colours as in the bars)', fill=(0, 0, 0),
              font=font)
    y += visualize.LINE_HEIGHT + 4
    for k, tile in enumerate(row):
      figure.paste(tile, (padding + k * (tile.width + padding), y))
    y += (row[0].height if row else 0) + padding
  return figure


def pick_images(domains: Sequence[int], per_domain: int) -> list[int]:
  """Up to `per_domain` image indices of each domain, evenly spread over the split, optical first."""
  domains = np.asarray(domains)
  chosen = []
  for k in range(len(DOMAIN_NAMES)):
    of_domain = np.flatnonzero(domains == k)
    if len(of_domain) > per_domain:
      of_domain = of_domain[np.linspace(0, len(of_domain) - 1, per_domain).round().astype(int)]
    chosen.extend(int(i) for i in of_domain)
  return chosen


def write_routing(grounder, data, directory, *, per_domain: int = 32, shown_per_domain: int = 3) -> dict:
  """Routes up to `per_domain` images of each domain of `data` (an evaluation.EvalSplit) and writes
  DIRECTORY/routing.json (the counts) and DIRECTORY/routing.png (process 0). Returns the summary:
  {'experts', 'images': {domain: n}, 'image_indices', 'patches_per_image': {block: nh*nw},
   'counts': {block: {domain: [E]}}}."""
  domains_all = [int(e['domain']) for e in data.examples]
  chosen = pick_images(domains_all, per_domain)
  if not chosen:
    raise ValueError(f'{data.split}: no images to route')
  canvases = [data.canvas(i) for i in chosen]
  maps = routing_maps(grounder, np.stack(canvases))
  num_experts = int(grounder.config.model.moe.num_experts)
  domains = [domains_all[i] for i in chosen]
  counts = usage_counts(maps, domains, num_experts)
  summary = {'experts': num_experts,
             'images': {d: int(sum(1 for x in domains if x == k)) for k, d in enumerate(DOMAIN_NAMES)},
             'image_indices': [data.examples[i]['index'] for i in chosen],
             'patches_per_image': {name: int(grid.shape[1] * grid.shape[2]) for name, grid in maps.items()},
             'counts': counts}
  if jax.process_index() == 0:
    shown = [j for k in range(len(DOMAIN_NAMES)) for j in [j for j, d in enumerate(domains) if d == k][:shown_per_domain]]
    figure = routing_figure(counts, maps, canvases, domains, shown)
    buffer = io.BytesIO()
    figure.save(buffer, format='PNG')
    paths.write_bytes_atomic(paths.path(directory) / 'routing.png', buffer.getvalue())
    paths.write_json_atomic(paths.path(directory) / 'routing.json', summary)
  return summary
