"""Input pipeline: shard locations, the built-in shapes dataset, tokenizers and Ray Data preprocessing."""
