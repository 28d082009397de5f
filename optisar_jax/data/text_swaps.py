"""Caption rewriting: the adversarial swap table and direction-aware flip rewriting.

* `adversarial_variants(caption)` reproduces the reference's "adversarial swap" generator
  (docs/training-and-data.md section 4.2): the caption is lower-cased and, for every rule of `SWAP_RULES` in
  table order, the FIRST occurrence of the rule's source phrase is replaced by its target, each rule
  applied on its own to the original text (never chained). The distinct results, in the order they are
  first produced, are the caption's hard negatives. Matching is by plain substring, as in the reference,
  so "bright" (which contains "right") yields "bleft"; `word_boundary=True` (config
  `data.negatives.word_boundary_swaps`, deviation 11.3) matches whole words only.
* `flip_rewrite(caption, horizontal)` rewrites direction words so that a caption stays true after the
  image is mirrored (deviation 11.1): a horizontal flip swaps left/right and east/west, a vertical flip
  swaps top/bottom, upper/lower, north/south and above/below. Whole words, case preserved, all swaps
  simultaneous (so "left ... right" becomes "right ... left", never "left ... left").
"""

from __future__ import annotations

import functools
import re

# (source, target) rules in the reference's table order; "a <-> b" pairs appear as two rules.
SWAP_RULES: tuple[tuple[str, str], ...] = (
    # corner phrases
    ('upper left corner', 'upper right corner'),
    ('upper right corner', 'upper left corner'),
    ('lower left corner', 'lower right corner'),
    ('lower right corner', 'lower left corner'),
    ('top left corner', 'top right corner'),
    ('top right corner', 'top left corner'),
    ('bottom left corner', 'bottom right corner'),
    ('bottom right corner', 'bottom left corner'),
    # position phrases
    ('in the middle', 'in the top'),
    ('in the middle', 'in the bottom'),
    ('in the middle', 'in the left'),
    ('in the middle', 'in the right'),
    ('in the middle', 'in the corner'),
    ('in the center', 'in the top'),
    ('in the center', 'in the bottom'),
    ('in the center', 'in the left'),
    ('in the center', 'in the right'),
    ('in the center', 'at the edge'),
    ('at the center', 'at the edge'),
    ('at the center', 'in the corner'),
    ('at the edge', 'at the center'),
    ('at the edge', 'in the middle'),
    ('middle of the', 'top of the'),
    ('middle of the', 'bottom of the'),
    ('middle of the', 'left of the'),
    ('middle of the', 'right of the'),
    ('center of the', 'edge of the'),
    ('center of the', 'corner of the'),
    # two-word directions
    ('upper left', 'upper right'),
    ('upper right', 'upper left'),
    ('lower left', 'lower right'),
    ('lower right', 'lower left'),
    ('top left', 'top right'),
    ('top right', 'top left'),
    ('bottom left', 'bottom right'),
    ('bottom right', 'bottom left'),
    ('left side', 'right side'),
    ('right side', 'left side'),
    ('top side', 'bottom side'),
    ('bottom side', 'top side'),
    # single directions
    ('upper', 'lower'),
    ('lower', 'upper'),
    ('left', 'right'),
    ('right', 'left'),
    ('top', 'bottom'),
    ('bottom', 'top'),
    ('middle', 'corner'),
    ('middle', 'edge'),
    ('center', 'edge'),
    ('center', 'corner'),
    # size (single words)
    ('huge', 'small'),
    ('huge', 'tiny'),
    ('large', 'small'),
    ('large', 'tiny'),
    ('big', 'small'),
    ('massive', 'tiny'),
    ('massive', 'small'),
    ('enormous', 'small'),
    ('enormous', 'tiny'),
    ('giant', 'tiny'),
    ('giant', 'small'),
    ('tiny', 'huge'),
    ('tiny', 'large'),
    ('small', 'large'),
    ('small', 'huge'),
    # density / state
    ('densely packed', 'sparsely distributed'),
    ('sparsely distributed', 'densely packed'),
    ('crowded', 'empty'),
    ('empty', 'crowded'),
    ('dense', 'sparse'),
    ('sparse', 'dense'),
    ('full', 'empty'),
    ('occupied', 'vacant'),
    ('vacant', 'occupied'),
    # appearance
    ('bright', 'dark'),
    ('dark', 'bright'),
    ('clear', 'blurry'),
    ('blurry', 'clear'),
    ('sharp', 'blurry'),
    ('visible', 'hidden'),
    ('hidden', 'visible'),
    # quantity
    ('many', 'few'),
    ('few', 'many'),
    ('multiple', 'single'),
    ('single', 'multiple'),
    ('several', 'one'),
    ('numerous', 'few'),
    # other
    ('horizontal', 'vertical'),
    ('vertical', 'horizontal'),
    ('wide', 'narrow'),
    ('narrow', 'wide'),
    ('long', 'short'),
    ('short', 'long'),
    ('close', 'distant'),
    ('distant', 'close'),
    ('near', 'far'),
    ('far', 'near'),
    # The reference's domain pairs ("sar" <-> "optical") and article-size pairs ("a huge" -> "a small")
    # are commented out there, and so are absent here (section 10.1).
)

_WORD_PATTERNS = {src: re.compile(r'\b' + re.escape(src) + r'\b') for src, _ in SWAP_RULES}


@functools.lru_cache(maxsize=1 << 17)
def _variants_cached(caption: str, word_boundary: bool) -> tuple[str, ...]:
  text = caption.lower()
  seen = set()
  out = []
  for src, tgt in SWAP_RULES:
    if word_boundary:
      variant, count = _WORD_PATTERNS[src].subn(tgt.replace('\\', r'\\'), text, count=1)
      if not count:
        continue
    else:
      pos = text.find(src)
      if pos < 0:
        continue
      variant = text[:pos] + tgt + text[pos + len(src):]
    if variant not in seen:
      seen.add(variant)
      out.append(variant)
  return tuple(out)


def adversarial_variants(caption: str, word_boundary: bool = False) -> list[str]:
  """All distinct hard-negative rewrites of `caption` (lower-cased), in swap-table order.

  Args:
    caption: the referring expression (used as given; callers strip it).
    word_boundary: False = the reference's substring matching; True = whole-word matching.
  Returns:
    A new list of distinct variant strings; empty when no rule fires.
  """
  return list(_variants_cached(caption, bool(word_boundary)))


# Direction words swapped by a flip. Each pair is symmetric; compounds are listed so that, e.g.,
# "northeast" becomes "northwest" under a horizontal flip.
HORIZONTAL_FLIP_PAIRS: tuple[tuple[str, str], ...] = (
    ('left', 'right'),
    ('leftmost', 'rightmost'),
    ('lefthand', 'righthand'),
    ('east', 'west'),
    ('eastern', 'western'),
    ('easternmost', 'westernmost'),
    ('eastward', 'westward'),
    ('eastwards', 'westwards'),
    ('northeast', 'northwest'),
    ('southeast', 'southwest'),
    ('northeastern', 'northwestern'),
    ('southeastern', 'southwestern'),
)
VERTICAL_FLIP_PAIRS: tuple[tuple[str, str], ...] = (
    ('top', 'bottom'),
    ('topmost', 'bottommost'),
    ('upper', 'lower'),
    ('uppermost', 'lowermost'),
    ('north', 'south'),
    ('northern', 'southern'),
    ('northernmost', 'southernmost'),
    ('northward', 'southward'),
    ('northwards', 'southwards'),
    ('northeast', 'southeast'),
    ('northwest', 'southwest'),
    ('northeastern', 'southeastern'),
    ('northwestern', 'southwestern'),
    ('above', 'below'),
)


def _build_flip_table(pairs):
  table = {}
  for a, b in pairs:
    table[a] = b
    table[b] = a
  words = sorted(table, key=lambda w: (-len(w), w))
  pattern = re.compile(r'\b(' + '|'.join(re.escape(w) for w in words) + r')\b', re.IGNORECASE)
  return table, pattern


_FLIP_TABLES = {True: _build_flip_table(HORIZONTAL_FLIP_PAIRS), False: _build_flip_table(VERTICAL_FLIP_PAIRS)}


def _match_case(template: str, word: str) -> str:
  if template.isupper() and len(template) > 1:
    return word.upper()
  if template[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


@functools.lru_cache(maxsize=1 << 17)
def _flip_cached(caption: str, horizontal: bool) -> str:
  table, pattern = _FLIP_TABLES[horizontal]
  return pattern.sub(lambda m: _match_case(m.group(0), table[m.group(0).lower()]), caption)


def flip_rewrite(caption: str, horizontal: bool = True) -> str:
  """The caption as it reads after mirroring the image (deviation 11.1).

  Args:
    caption: the referring expression.
    horizontal: True for a left-right flip (left<->right, east<->west, ...); False for a top-bottom
      flip (top<->bottom, upper<->lower, north<->south, above<->below, ...).
  Returns:
    The rewritten caption. Whole words only, all swaps simultaneous; lower-case, Capitalised and
    UPPER-case words keep their case, so applying the same flip twice returns the original caption.
  """
  return _flip_cached(caption, bool(horizontal))
