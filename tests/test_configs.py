"""Every configs/*.py carries all the base keys, shows its run command, and is locked."""

import glob
import importlib.machinery
import importlib.util
import os

import pytest

from configs.base import get_base_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) != "__init__.py")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _keys(c, prefix=""):
  out = set()
  for k, v in c.items():
    out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
  return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_has_every_key_and_a_run_command(path):
  module = _load(path)
  config = module.get_config()
  assert _keys(config) == _keys(get_base_config())
  assert "scripts/train.py --config configs/" + os.path.basename(path) in module.__doc__
  config.lock()
  with pytest.raises(AttributeError):
    config.train.stepz = 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_paths_do_not_depend_on_the_working_directory(path, tmp_path, monkeypatch):
  """A config loaded as configs/NAME.py (the documented command) names files any directory finds, so
  a rerun from elsewhere resumes the same run."""
  monkeypatch.chdir(ROOT)
  name, relative = os.path.basename(path)[:-3], os.path.relpath(path, ROOT)
  loader = importlib.machinery.SourceFileLoader(name, relative)  # as config_flags loads it: __file__ relative
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
  loader.exec_module(module)
  config = module.get_config()
  paths = [p for p in (config.model.path, config.data.train, config.data.eval) if p and os.path.exists(p)]
  monkeypatch.chdir(tmp_path)
  for p in paths:
    assert os.path.isabs(p) and os.path.exists(p), p
