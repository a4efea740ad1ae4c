"""The K checkpoints of a sweep: their file formats (``formats``: safetensors, torch pickles read safely),
the pool that reads them a few at a time (``checkpoint_pool``) and the checks of their weights (``basin``: NaN/Inf,
a shared basin). Imports from ``engine`` and below."""
