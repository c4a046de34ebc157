"""Encoder models (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) served for embeddings and token classification.

`config` reads config.json and names the weights of each family, `model` is the encoder's forward pass,
`pooling` turns its hidden states into one vector per input (sentence-transformers' modules when the
model has them), `engine` validates and runs Embed/Classify/Warmup/Health calls, and `service` is the
gRPC servicer a shard runs for such a model instead of the generating one. No KV cache, no adapters.
"""
