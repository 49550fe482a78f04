"""The front ends: `http` (routes, bodies, OpenAPI, guard), `grpc` (servicers, server) and `v2`
(the Open Inference Protocol, mounted by both); `grpc_status` is what every gRPC servicer shares."""
