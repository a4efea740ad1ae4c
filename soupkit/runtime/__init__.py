"""What every layer runs on: CPU numerics pinned before torch loads (``numerics``), torch.distributed groups
(``distributed``), peak-memory measurement and caps (``memory``), progress lines (``progress``) and the guarded
imports of optional libraries (``_compat``). Imports nothing else of soupkit but ``errors`` and ``io``."""
