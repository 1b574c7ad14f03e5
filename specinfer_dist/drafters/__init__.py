from specinfer_dist.drafters.base import DraftRequest, Drafter
from specinfer_dist.drafters.ngram import NgramDrafter
from specinfer_dist.drafters.ssm import SSMDrafter

__all__ = ["DraftRequest", "Drafter", "NgramDrafter", "SSMDrafter"]
