"""Generated package `service.stubs.tensorflow.core.example`: `make proto`; never edit."""
