"""Dreamer 4's world model on Craftax-Classic.

The idea, one module each: the causal tokenizer (``tokenizer``, its loss ``tokenizer_loss``), the
dynamics model (``dynamics``) and its shortcut-forcing objective (``shortcut_forcing``),
autoregressive sampling with a KV cache (``rollout``) and real-time play (``realtime``).
Around it: the networks from a config (``models``), frames and actions (``data``), the latent
cache (``latents``), the held-out evaluation (``rollout_eval``), the stages (``tokenizer_stage``,
``dynamics_stage``, the ``synthetic_actions`` diagnostic) and the task the trunk trains
(``task``). Apps: ``evaluate``, ``rollout_gif``, ``play`` and ``bench_fps``, each
``python -m jaxai.world_model.<app>``.
"""
