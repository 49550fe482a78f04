"""Generated package `service.stubs.kserve`: `make proto`; never edit."""
