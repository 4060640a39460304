"""BUILD lists every module and test file of the tree, with the deps their imports name."""
import os
import re
import sys

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


def test_every_imported_package_is_a_known_requirement():
  # A third-party import missing from THIRD_PARTY would get no requirement() in BUILD.
  ours = {"jaxai", "kernels_pallas", *build_file.test_helpers()}
  unknown = set()
  for d in ("jaxai", "kernels_pallas", "tests"):
    for path in build_file._python_files(d):  # pylint: disable=protected-access
      for name in build_file._imports(path):  # pylint: disable=protected-access
        top = name.split(".")[0]
        if top not in ours and top not in sys.stdlib_module_names and top not in build_file.THIRD_PARTY:
          unknown.add(f"{top} ({path})")
  assert not unknown, sorted(unknown)
