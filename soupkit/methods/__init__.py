"""The ten soup methods: the registry and the baselines (``registry``: ``METHODS``, ``make_soup``), Learned-Soup
and the HL / MEHL hyperplane soups (``learned``), the resumable run folder (``run_dir``) and the result with its
evaluation (``result``). Imports from ``pool`` and below."""
