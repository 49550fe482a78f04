"""Generated package `service.stubs.tensorflow.core.framework`: `make proto`; never edit."""
