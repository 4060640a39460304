"""The decoder LM every language paper builds on: the model (``model``), its training task
(``task``), KV-cached sampling (``sampling``) and the ``sample`` command."""
