"""The market: negotiation and job transfer between nodes, both sides.

Modules:
    wire      frame channels (a libp2p stream, or an in-memory pair for a node dealing with itself) and the
              send/receive of plain and signed messages with every check at the boundary
    provider  the provider side: `/coop/negotiate/1.0.0` (quotes from MarketPolicy) and `/coop/job/1.0.0`
              (admission, inputs, sandboxed run, live logs, result, outputs, receipt)
    settle    `/coop/receipt/1.0.0`: a provider asks the client for a countersignature the job stream lost
    jobs      the client side: JobManager (find, quote k in parallel, rank, agree, transfer, receipt, retry on
              the next candidate, recovery after a restart)
    requests  validation of job submissions from the local API
    queue     JobQueue: the cap on a node's unfinished jobs and the slots that let only a few negotiate at once
"""
