"""Federated P-RGE: many devices improve one adapter, sending only seeds and scalars.

A P-RGE update is a pure function of (adapter, seed, g, lr), so a round's whole update is the
list of its clients' (seed, g, lr): every participant rebuilds the new global adapter by
replaying that list (runtime_driver/replay.py), and no adapter tensor is ever sent.
protocol.py: what travels and how a reply is checked; ledger.py: the server's round log and
the global adapter it determines; client.py: a client's local steps.
"""
