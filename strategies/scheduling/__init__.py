"""Built-in schedulers: choose which units train at each optimizer step."""
