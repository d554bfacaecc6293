"""The drop-in (`enable` / `disable`) and every private transformers call it relies on."""
