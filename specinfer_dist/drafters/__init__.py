from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.drafters.ngram import NgramDrafter
from specinfer_dist.drafters.ssm import SSMDrafter

__all__ = ["DraftRequest", "Drafter", "NgramDrafter", "SSMDrafter"]
