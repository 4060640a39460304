"""The house plan's dependency rules, on the module graph BUILD is generated from (every import,
lazy ones inside functions included): no cycle anywhere; kernels_pallas imports only jax; shared
building blocks and the trunk never import a paper package; paper packages never import each other."""
import graphlib
import sys

import pytest

from jaxai import build_file

GRAPH = build_file.module_graph()
PAPER_PACKAGES = ("jaxai.diffusion_lm", "jaxai.dsa", "jaxai.trm", "jaxai.world_model")
SHARED_BLOCKS = ("jaxai.nn", "jaxai.lm", "jaxai.rl")
TRUNK = ("jaxai.main", "jaxai.train", "jaxai.stages", "jaxai.config_lib", "jaxai.checkpointing",
         "jaxai.sharding", "jaxai.metrics", "jaxai.optimizer", "jaxai.dry_run", "jaxai.cli",
         "jaxai.host", "jaxai.data")


def _in(module: str, packages) -> bool:
  return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_module_graph_has_no_cycle():
  try:
    graphlib.TopologicalSorter(GRAPH).prepare()
  except graphlib.CycleError as e:
    pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_a_cycle_would_be_found():  # the check above can fail
  with pytest.raises(graphlib.CycleError):
    graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}}).prepare()


def test_kernels_import_only_jax():
  for path in build_file._python_files("kernels_pallas"):  # pylint: disable=protected-access
    tops = {name.split(".")[0] for name in build_file._imports(path)}  # pylint: disable=protected-access
    assert tops - set(sys.stdlib_module_names) <= {"jax", "kernels_pallas"}, (path, tops)


@pytest.mark.parametrize("layer", [TRUNK, SHARED_BLOCKS, ("jaxai.craftax",)], ids=["trunk", "shared", "craftax"])
def test_no_layer_below_the_papers_imports_one(layer):
  bad = [(m, d) for m, deps in GRAPH.items() if _in(m, layer) for d in deps if _in(d, PAPER_PACKAGES)]
  assert not bad, bad


def test_paper_packages_do_not_import_each_other():
  for paper in PAPER_PACKAGES:
    others = [p for p in PAPER_PACKAGES if p != paper]
    bad = [(m, d) for m, deps in GRAPH.items() if _in(m, (paper,)) for d in deps if _in(d, others)]
    assert not bad, bad


def test_every_library_module_is_placed_in_a_layer():
  placed = TRUNK + SHARED_BLOCKS + PAPER_PACKAGES + ("jaxai.craftax", "jaxai.bench", "jaxai.build_file",
                                                     "kernels_pallas", "jaxai")
  assert [m for m in GRAPH if not _in(m, placed)] == []
