"""A seeded discrete-event simulation of a Coop network, driving the project's own policy code (issue 11).

Modules:
    population: the simulated nodes (capacity, owners' idle hours, prices, adversary roles, identities) and jobs.
    engine: the event queue (simulated time, Unix ms) and the link model (latency, loss, duplication).
    trustviews: how a client scores providers: the project's ``compute_trust``, textbook EigenTrust, or none.
    market: a job's life: discovery, the negotiation machines, ranking, execution, verification, receipts, records.
    measures: counters and time series, and the printed report.
    plots: the PNG figures (needs matplotlib, the ``sim`` extra).
    run: the command line, ``python scripts/sim/run.py --nodes 1000 --seed 1``.

Everything random comes from one ``random.Random(seed)``; nothing reads the wall clock except run.py's report of
its own run time, which is not part of the results.
"""
