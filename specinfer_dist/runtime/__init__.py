"""What a step runs on: KV caches and the block pool, the model runner, the LLM-side verifier, sampling parameters."""
