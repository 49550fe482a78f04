"""Generated package `service.stubs.tensorflow.core`: `make proto`; never edit."""
