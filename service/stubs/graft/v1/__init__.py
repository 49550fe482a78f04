"""Generated package `service.stubs.graft.v1`: `make proto`; never edit."""
