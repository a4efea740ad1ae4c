"""The one optimisation loop of every learned soup (``loop``: the simplex and hyperplane spaces and ``optimise``),
with what it stands on: which tensors share a coefficient (``layers``), directions and inner products
(``directions``), the one DataLoader builder and the held-out batch stream (``batches``), ``functional_call``
logits and accuracy (``evaluation``) and the held-out data checks (``heldout``). Imports from ``runtime`` and the
top-level ``config``, ``errors``, ``io``."""
