"""Every config parses in all its variants, and its tiny variant trains."""
import glob
import importlib.util
import os

import pytest

from jaxai import config_lib, main

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_in_every_variant(path):
  module = load(path)
  assert module.__doc__ and "python -m jaxai.main" in module.__doc__, "docstring must give the command"
  for variant in ("tiny", None, "full"):
    config = module.get_config(variant)
    assert config.task and config.total_steps > 0
    config_lib.resolve_mesh_shape(config.mesh, 8)
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    module.get_config("no-such-variant")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_tiny_variant_trains(path, tmp_path):
  config = load(path).get_config("tiny")
  results = main.run(config, str(tmp_path))
  assert results and all(r["step"] == config.total_steps or "loss" in r for r in results)
