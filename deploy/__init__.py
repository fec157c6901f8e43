"""Past one machine: nginx as a per-request gRPC balancer (nginx.py), network namespaces as stand-in hosts
for tests (namespaces.py), and the Kubernetes manifests (kubernetes/)."""
