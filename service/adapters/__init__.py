"""Which adapter version this replica serves, and why.

manager    every change of the live version (announcements, start-up, admin pin/unpin/rollback), one at
           a time: checks, load, KL probe, swap; refusals with reasons
checks     what a version must pass before it may go live (files, hashes, shapes, finite, KL probe)
follower   the thumbtune.adapters consumer that hands every announcement to the manager
"""
