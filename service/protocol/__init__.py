"""The front ends: `http` (routes, bodies, OpenAPI, guard) and `grpc` (servicers, server)."""
