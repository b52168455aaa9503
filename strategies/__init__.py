"""Built-in strategies, each a plugin module registered through the ``slimfit_accel`` entry points.

Grouped by kind: ``scoring/``, ``scheduling/``, ``compression/``. Each module is small and
self-contained: copy one to start your own plugin.
"""
