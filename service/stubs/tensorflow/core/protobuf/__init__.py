"""Generated package `service.stubs.tensorflow.core.protobuf`: `make proto`; never edit."""
