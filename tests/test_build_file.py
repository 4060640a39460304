"""BUILD lists every module and test file of the tree, with the deps their imports name."""
import os
import re

from jaxai import build_file


def test_build_file_is_in_sync_with_the_tree():
  with open(os.path.join(build_file.REPO_ROOT, "BUILD"), encoding="utf-8") as f:
    current = f.read()
  assert current == build_file.render(), "BUILD is stale: run `python -m jaxai.build_file --write`"


def test_every_python_file_has_a_target():
  with open(os.path.join(build_file.REPO_ROOT, "BUILD"), encoding="utf-8") as f:
    srcs = set(re.findall(r'srcs = \["([^"]+)"\]', f.read()))
  on_disk = {os.path.relpath(os.path.join(root, name), build_file.REPO_ROOT)
             for d in ("jaxai", "kernels_pallas", "tests")
             for root, _, names in os.walk(os.path.join(build_file.REPO_ROOT, d))
             for name in names if name.endswith(".py")}
  assert srcs == on_disk
