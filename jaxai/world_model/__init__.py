"""Dreamer 4 world model on Craftax-Classic: causal tokenizer (``tokenizer``, ``tokenizer_loss``) and
the task that trains it (``task``). The dynamics model (shortcut forcing) comes with issue 5.
"""
