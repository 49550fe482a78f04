"""Generated package `service.stubs.tensorflow_serving`: `make proto`; never edit."""
