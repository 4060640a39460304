"""Every config parses in all its variants, declares its stages, and its tiny variant trains."""
import glob
import os

import pytest

from conftest import REPO_ROOT, config_of
from jaxai import config_lib, main, stages, train

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_in_every_variant(name):
  for variant in ("tiny", None, "full"):
    config = config_of(name, variant)
    assert config.task and stages.selected(config)
    for stage in stages.order(config):
      c = stages.stage_config(config, stage)
      assert c.total_steps > 0
      config_lib.resolve_mesh_shape(c.mesh, 8)
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    config_of(name, "no-such-variant")


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_gives_the_command_and_a_figure_with_its_host(name):
  with open(os.path.join(REPO_ROOT, "configs", f"{name}.py"), encoding="utf-8") as f:
    source = f.read()
  doc = source.split('"""')[1]
  assert "python -m jaxai.main" in doc, "the docstring must give the command"
  assert any(word in doc for word in ("AVX2", "AVX-512", "AMX")), "a figure needs its host class"


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_variant_trains_every_stage_as_written(name, tmp_path, request):
  if name in ("diffusion_lm", "dsa", "trm", "world_model"):  # trained once for every test that reads it
    config, tmp_path = request.getfixturevalue(f"tiny_{name}")
  else:
    config = config_of(name, "tiny")
    main.run(config, str(tmp_path))
  for stage in stages.selected(config):
    rows = train.read_metrics(str(tmp_path / stage))
    assert rows[-1]["step"] == stages.stage_config(config, stage).total_steps
    assert os.path.exists(tmp_path / stage / "config.json")
