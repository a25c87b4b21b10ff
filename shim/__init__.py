"""creditledger's thin Python shim: signature checks, provider clients, CLI and jobs."""
