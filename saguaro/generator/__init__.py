"""What a `SpeculativeGenerator` is made of: the method policy (which method, its draft-length
controllers), the runner pool (the packed target, runners, prefix caches), the draft side (the
prepared draft, the Saguaro worker's lifetime), a call's requests (prompts, samplers, stop rules)
and the decoding of one call with them. `saguaro.api` puts them together; `saguaro.engine` reuses them."""
