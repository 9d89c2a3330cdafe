"""The multi-process testbed: one process per "node" on one machine.

`launcher` starts the processes (optionally in network namespaces joined by
rate-shaped links, `netns`); `distributed` initialises JAX's multi-host runtime in
each and watches for dead peers. The library core never imports this package.
"""
