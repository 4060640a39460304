"""A name -> function table, filled with the ``register`` decorator."""
from typing import Callable


class Registry:
  """Functions by name; ``get`` names the known ones when asked for another."""

  def __init__(self, kind: str):
    self.kind = kind
    self._functions: dict[str, Callable] = {}

  def register(self, name: str):
    def decorate(fn):
      if name in self._functions:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._functions[name] = fn
      return fn
    return decorate

  def get(self, name: str) -> Callable:
    if name not in self._functions:
      raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._functions))}")
    return self._functions[name]

  def names(self) -> list[str]:
    return sorted(self._functions)
