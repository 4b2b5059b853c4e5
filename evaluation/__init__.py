"""Evaluation: the LLM judge, AlpacaEval win rates, MT-Bench and the report."""
