"""Generated package `service.stubs.tensorflow_serving.apis`: `make proto`; never edit."""
