"""MMDL: multimodal multitask encoders for chest X-ray retrieval (Yu et al., MICCAI 2021)."""
