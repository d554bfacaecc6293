"""Tooling: `saguaro bench`, its report, prefix-reuse scenarios, the demo pair, memory sampling."""
