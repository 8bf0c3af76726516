"""Training under DeepSpeed ZeRO: configs (config.py), token shards (tokens.py), the engine
(engine.py), atomic checkpoints (checkpoint.py), the loop (loop.py), metrics (metrics.py)."""
