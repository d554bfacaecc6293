"""Running a model: runners, KV caches, the prefix cache, packed linears, weight epochs, trees."""
