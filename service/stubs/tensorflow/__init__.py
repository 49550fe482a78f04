"""Generated package `service.stubs.tensorflow`: `make proto`; never edit."""
