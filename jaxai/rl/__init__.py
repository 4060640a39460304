"""RL pieces every paper shares: pure policy losses (``losses``) and advantage estimators
(``advantages``), each registered by name so a config picks one with a string
(``losses.get("reinforce")``); Dreamer 4's PMPO policy loss with its KL to a frozen prior
(``pmpo``, a plain function: it takes the prior's logits too); TD(lambda) returns with continuation
flags (``returns``); and symexp two-hot heads for rewards and values (``twohot``). The GRPO family
joins them with the RL lab."""
