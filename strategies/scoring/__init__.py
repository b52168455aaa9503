"""Built-in scorers: turn what a unit did in the step it was trained into a score."""
