"""graft's HTTP API: /classify, TF Serving REST, management, OpenAPI, the request guard."""
