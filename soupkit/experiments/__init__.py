"""The paper's experiments on top of the library: one method run as a record (``run``), the studies, ablations
and seeds, statistics (``stats``), tables, claims and plots, the notebook runner and its parameter checks.
Notebooks import from here; nothing below imports it."""
