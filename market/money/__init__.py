"""Buyers' and nodes' money in the database: ``accounts`` (buyers, keys, credit),
``billing`` (holds, charges, refunds, node earnings — the hot-path statements) and
``journal`` (every movement written once, and the audit that checks balances against it).
"""
