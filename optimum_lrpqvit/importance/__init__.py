"""Layer importance criteria for mixed precision, one module each, registered under their names:
``lrp`` and ``lrp_per_role`` (``importance.lrp``), ``fisher`` (``importance.fisher``), ``random`` and
``uniform`` (``importance.ablation``)."""

# isort: off
# Import order is registration order, which is the order that errors and `lrpqvit quantize --help` list.
from . import lrp as _lrp  # noqa: F401
from . import fisher as _fisher  # noqa: F401
from . import ablation as _ablation  # noqa: F401
# isort: on
from .base import ImportanceCriterion, importance_criterion, normalised_over, relative_importance
from .fisher import fisher_importance
from .lrp import per_role

__all__ = ["ImportanceCriterion", "fisher_importance", "importance_criterion", "normalised_over", "per_role",
           "relative_importance"]
