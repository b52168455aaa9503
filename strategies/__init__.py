"""Built-in strategies, each a plugin module registered in code (``slimfit_accel.plugins.BUILTIN_PLUGINS``).

Grouped by kind: ``scoring/``, ``scheduling/``, ``compression/``. Each module is small and
self-contained: copy one to start your own plugin.
"""
