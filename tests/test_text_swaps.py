"""Adversarial swap table (docs/training-and-data.md 4.2) and direction-aware flip rewriting (deviation 11.1)."""

import pytest

from optisar_jax.data import text_swaps
from optisar_jax.data.text_swaps import adversarial_variants, flip_rewrite


def test_table_shape_and_order():
  rules = text_swaps.SWAP_RULES
  assert rules[0] == ('upper left corner', 'upper right corner')
  assert rules[-1] == ('far', 'near')
  assert len(rules) == 97
  assert ('sar', 'optical') not in rules and ('optical', 'sar') not in rules  # disabled in the reference
  # both directions of a <-> pair are separate rules
  assert ('left', 'right') in rules and ('right', 'left') in rules
  assert ('full', 'empty') in rules and ('empty', 'full') not in rules


def test_left_right_swap():
  assert adversarial_variants('the plane on the left') == ['the plane on the right']
  assert adversarial_variants('the plane on the right') == ['the plane on the left']


def test_corner_phrase_rules_and_distinct_results():
  variants = adversarial_variants('The ship in the Upper Left corner')
  # corner rule first; "upper left" -> "upper right" gives the same string (kept once); then upper -> lower
  assert variants[0] == 'the ship in the upper right corner'
  assert 'the ship in the lower left corner' in variants
  assert len(variants) == len(set(variants))
  assert all(v == v.lower() for v in variants)


def test_first_occurrence_only_and_not_chained():
  assert adversarial_variants('left of the left ship') == ['right of the left ship']
  variants = adversarial_variants('the large ship on the left')
  assert 'the small ship on the left' in variants and 'the tiny ship on the left' in variants
  assert 'the large ship on the right' in variants
  assert 'the small ship on the right' not in variants          # rules are not chained


def test_substring_matching_is_the_default():
  variants = adversarial_variants('a bright tank')
  assert 'a bleft tank' in variants                              # "right" inside "bright"
  assert 'a dark tank' in variants
  assert adversarial_variants('the farm') == ['the nearm']       # "far" inside "farm"


def test_word_boundary_option():
  variants = adversarial_variants('a bright tank', word_boundary=True)
  assert 'a bleft tank' not in variants
  assert variants == ['a dark tank']
  assert adversarial_variants('the farm', word_boundary=True) == []
  assert adversarial_variants('the plane on the left', word_boundary=True) == ['the plane on the right']


def test_no_rule_fires():
  assert adversarial_variants('a storage tank') == []
  assert adversarial_variants('') == []


@pytest.mark.parametrize('caption, expected', [
    ('the plane on the left', 'the plane on the right'),
    ('Left of the right tank', 'Right of the left tank'),
    ('the ship in the upper left corner', 'the ship in the upper right corner'),
    ('the pier EAST of the west harbor', 'the pier WEST of the east harbor'),
    ('the northeast tank', 'the northwest tank'),
    ('the top-left plane', 'the top-right plane'),
    ('a bright leftover', 'a bright leftover'),                  # whole words only
    ('the leftmost vehicle', 'the rightmost vehicle'),
    ('the upper ship at the top', 'the upper ship at the top'),  # vertical words untouched
])
def test_flip_rewrite_horizontal(caption, expected):
  assert flip_rewrite(caption, horizontal=True) == expected


@pytest.mark.parametrize('caption, expected', [
    ('the ship in the upper left corner', 'the ship in the lower left corner'),
    ('the tank at the top, above the bottom road', 'the tank at the bottom, below the top road'),
    ('North of the South pier', 'South of the North pier'),
    ('the northeast tank', 'the southeast tank'),
    ('the plane on the left', 'the plane on the left'),
])
def test_flip_rewrite_vertical(caption, expected):
  assert flip_rewrite(caption, horizontal=False) == expected


def test_flip_twice_is_identity():
  captions = ['the plane on the left', 'Left of the right tank near the LEFT edge',
              'the ship in the upper right corner', 'northeast of the western pier, above the top road',
              'a bright tank', 'The Bottom-Left Ship']
  for c in captions:
    for horizontal in (True, False):
      assert flip_rewrite(flip_rewrite(c, horizontal), horizontal) == c
