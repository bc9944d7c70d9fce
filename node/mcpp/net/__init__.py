"""The network layer: identity keys, the libp2p host, the Kademlia DHT, the RPC protocol and the
peer table with its formulas. The only layer that imports libp2p.

May import: the base modules at the top of the package (config, errors, log, metrics). Nothing
is re-exported here: `mcpp keygen` should not load the whole libp2p stack; import the modules.
"""
