"""Where the fine-tunes come from: the embedded zoos built on this machine (``config``, ``build``, ``recipe``,
``files``, ``embedded_data``, ``embedded_models``), the paper-scale checkpoints and data (``clip``, ``realdata``,
``hub``, ``sweep``) and one entry point to open either (``sources.open_zoo``). Imports from ``methods`` and below."""
