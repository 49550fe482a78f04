"""The BentoML services, `graft serve` and its draining supervisor: where the rooms meet."""
