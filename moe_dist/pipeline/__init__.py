"""Pipeline parallelism: the model's layers split into stages over the `pp` axis of the topology.

    stages     which layers each (virtual) stage holds, and which virtual stages each pp rank runs (arithmetic)
"""
