"""driftloss: the drifting loss of "Generative Modeling via Drifting" (Deng et al., 2026).

    loss = driftloss.drifting_loss(x, pos, neg, taus)

works on NumPy, PyTorch, JAX and any Array API namespace. Framework glue lives in
``driftloss.adapters.torch`` and ``driftloss.adapters.jax``.
"""

from driftloss._feature_groups import feature_groups, global_group, input_group
from driftloss._groups_loss import drifting_loss_groups
from driftloss._guidance import cfg_weight
from driftloss._loss import DEFAULT_TAUS, drift_field, drifting_loss

__all__ = ["DEFAULT_TAUS", "cfg_weight", "drift_field", "drifting_loss", "drifting_loss_groups",
           "feature_groups", "global_group", "input_group"]
__version__ = "0.1.0"
