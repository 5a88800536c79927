"""Which adapter version this replica serves, and why.

manager    every change of the live version (announcements, start-up, the cluster's decisions), one at a
           time: swaps, pins, rollbacks, refusals with reasons; the state the control log folds into
admission  what a version must pass before it may serve here: files checked, weights loaded, the KL probe
checks     the checks themselves (files, hashes, shapes, finite, KL probe)
control    thumbtune.control: decisions applied by every replica in one order, receipts, replay at start-up
follower   the thumbtune.adapters consumer that hands every announcement to the manager
view       what GET /admin/adapters shows
"""
