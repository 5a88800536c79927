"""thumbtune: a deployed chat model that gets better from its users' ratings, live.

Layers, from the bottom (each imports only the ones below it; docs/ARCHITECTURE.md):

    thumbtune.core      what the server and the learner share (contract, settings, model, store, Kafka)
    service, learner    the server and the learner, which never import each other
    thumbtune.cli       the `thumbtune` command, `thumbtune up`, the embedded broker, simulated users
    benchmarks          above everything, run from a checkout, never shipped
"""
