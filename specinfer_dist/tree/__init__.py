from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.sampling import sampling_probs
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree, ancestor_mask, depths
from specinfer_dist.tree.verify import verify_greedy, verify_mss, verify_naive

__all__ = ["TokenTree", "TreeSpec", "ancestor_mask", "depths", "merge_trees", "sampling_probs", "verify_greedy", "verify_mss",
           "verify_naive"]
