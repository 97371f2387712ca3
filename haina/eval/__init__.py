"""Evaluation: `haina eval <kind>` — perplexity, generation metrics, efficiency, attention maps, lm-eval.

Every kind writes the same report (`report.py`): `report.json` with the numbers and what produced them,
`report.md` for people, PNGs where a picture says more; `haina eval compare` puts several side by side.
"""
