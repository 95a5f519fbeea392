"""Trust without a center: signed reputation records, gossip and pull sync, local trust scores.

Modules:
    records   the reputation_records table: store verified bundles (one per rater per receipt, newest wins),
              page through them for the pull path, turn them into trust evidence
    service   the trio service: rate finished jobs, publish on /coop/reputation/1, validate what arrives
              (signature, receipt binding, size, freshness, per-rater rate), serve and run /coop/sync/1.0.0,
              keep the trust table (protocol/trust.py) current
"""
