"""Config overrides go through ml_collections.config_flags: typed values, one-line errors naming the key."""

import ml_collections
import pytest

from optisar_jax import config as config_lib
from optisar_jax.config import apply_overrides, load_config


def test_overrides_are_parsed_with_the_type_of_the_field():
  config = load_config('tiny', ['train.num_steps=7', '--config.optim.lr=1', 'model.moe.noisy_gating=false',
                                'model.tgdg.gate_init=(0, 0)', 'mesh.shape=(4, 2)', 'data.data_dir=/x/1',
                                "mesh.sharding_rules=(('.*', ('fsdp',)),)", 'text.encoder='])
  assert config.train.num_steps == 7 and isinstance(config.train.num_steps, int)
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)        # an int literal for a float
  assert config.model.moe.noisy_gating is False
  assert config.model.tgdg.gate_init == (0, 0) and config.mesh.shape == (4, 2)
  assert config.data.data_dir == '/x/1'                                        # a string stays a string
  assert config.mesh.sharding_rules == (('.*', ('fsdp',)),)
  assert config.text.encoder == ''
  untouched = load_config('tiny')
  assert untouched.train.num_steps != 7 and untouched.model.tgdg.gate_init == (1.0, 0.0)


@pytest.mark.parametrize('override,error,message', [
    ('train.nosuch=1', KeyError, "config key 'train.nosuch' does not exist"),
    ('nosuch.deeper=1', KeyError, "config key 'nosuch' does not exist"),
    ('train.num_steps=abc', ValueError, "config key 'train.num_steps': cannot read 'abc'"),
    ('train.num_steps=1.5', ValueError, "config key 'train.num_steps': cannot read '1.5'"),
    ('model.moe.noisy_gating=maybe', ValueError, "config key 'model.moe.noisy_gating': cannot read 'maybe'"),
    ('model.tgdg.gate_init=abc', ValueError, "config key 'model.tgdg.gate_init': cannot read 'abc'"),
    ('train.num_steps', ValueError, "config override 'train.num_steps': expected key=value"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(override, error, message):
  with pytest.raises(error) as info:
    load_config('tiny', [override])
  text = info.value.args[0]
  assert message in text and '\n' not in text


def test_apply_overrides_returns_a_new_config_and_checks_keys():
  base = ml_collections.ConfigDict({'train': {'num_steps': 3, 'lr': 0.5}, 'name': 'x'})
  changed = apply_overrides(base, ['train.num_steps=9', 'train.lr=2', 'name=y'])
  assert (changed.train.num_steps, changed.train.lr, changed.name) == (9, 2.0, 'y')
  assert (base.train.num_steps, base.train.lr, base.name) == (3, 0.5, 'x')
  with pytest.raises(KeyError, match="config key 'train.steps' does not exist"):
    apply_overrides(base, ['train.steps=1'])
  assert apply_overrides(base, []) is base


def test_config_file_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nosuch: config file not found'):
    load_config('nosuch')
  bad = tmp_path / 'bad.py'
  bad.write_text('X = 1\n')
  with pytest.raises(ValueError, match=f'{bad}: config file defines no get_config'):
    load_config(str(bad))
  assert config_lib.resolve_config_path('tiny').endswith('configs/tiny.py')
