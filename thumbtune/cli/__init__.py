"""The top of the product: the `thumbtune` command and what it starts.

main       the command (typer): serve, learn, broker, up, model, simulate (and bench, from a checkout)
up         `thumbtune up`: broker, server and learner as child processes
broker     the embedded Tansu broker
process    child processes that never outlive their parent
simulate   simulated users rating through the public API, by a rule (rules)
"""
