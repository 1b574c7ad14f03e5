"""Tree choice from measured costs: ``--tree auto`` and ``specinfer-dist tune-tree``."""
