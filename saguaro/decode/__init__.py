"""The decoding loops (one row, a batch), stop rules, lossless verification, sampling, stats."""
