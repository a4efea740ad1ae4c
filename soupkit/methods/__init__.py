"""The soup methods: the registry and the baselines (``registry``: ``METHODS``, ``make_soup``), Learned-Soup
and the HL / MEHL hyperplane soups (``learned``, ``hyperplane``), Model Stock and task arithmetic (``model_stock``,
``task_arithmetic``: not the paper's; they need the pretrained model), the resumable run folder (``run_dir``) and
the result with its evaluation (``result``). Imports from ``pool`` and below."""
