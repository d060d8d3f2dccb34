"""Prompting4Debugging: an opt-in audit of a safety mechanism that looks for hard prompts evading it
(``techniques.md`` §4.13). Dual use: absent from the node list, in both hosts, unless ``ATELIER_EVALUATION_NODES=1``."""
