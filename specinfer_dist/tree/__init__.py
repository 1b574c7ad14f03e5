from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree, ancestor_mask, depths
from specinfer_dist.tree.verify import verify_greedy

__all__ = ["TokenTree", "TreeSpec", "ancestor_mask", "depths", "merge_trees", "verify_greedy"]
