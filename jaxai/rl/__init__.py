"""RL pieces every paper shares: pure policy losses (``losses``) and advantage estimators
(``advantages``), each registered by name so a config picks one with a string
(``losses.get("reinforce")``). PMPO and the GRPO family join them with the agent and the RL lab."""
