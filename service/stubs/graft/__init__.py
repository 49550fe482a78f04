"""Generated package `service.stubs.graft`: `make proto`; never edit."""
