"""The Coop daemon: trio services wiring the pure protocol to libp2p, SQLite and the sandbox.

Modules:
    cli          the `node` / `coop` command line (argparse), one function per subcommand
    config       data dir, identity key and the commented TOML config
    net          the only importer of libp2p: host (Noise-only), DHT, streams
    daemon       `node start`: the long-running node and its services
    capacity/    probe (psutil, NVML) and pure summary of what this machine can offer
    sandbox/     executor tiers (bubblewrap, Landlock), metering, killing, `node doctor`
    api          local HTTP+JSON API (token-protected) served on trio
    client       small HTTP client of the local API, used by the CLI and scripts
"""
