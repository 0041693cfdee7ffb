"""rmi_triton: a fast, light and robust Region Mutual Information loss.

    from rmi_triton import RMILoss
    crit = RMILoss()                      # the paper's defaults
    loss = crit(logits, labels)           # logits [N, C, H, W], labels [N, H, W]
"""

from .loss import RMILoss, RMINumericsWarning, RMITerms, rmi_loss, rmi_terms
from .options import RMIOptions
from .reference import reference_rmi

__all__ = ["RMILoss", "RMIOptions", "RMITerms", "RMINumericsWarning", "rmi_loss", "rmi_terms",
           "reference_rmi"]
__version__ = "0.1.0"
