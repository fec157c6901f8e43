"""Re-identification data and metrics, torch-free: Market-1501's layout and names, and its evaluation
protocol (CMC rank-k, mAP), shared by training, the synthetic dataset and the client's `evaluate`."""
