"""Differential privacy: mechanisms, noise sources and the accountant (``[privacy]``).

* :mod:`~fedlearn.privacy.noise` - where noise comes from (secure or seeded);
* :mod:`~fedlearn.privacy.accountant` - DP events and the ledger that composes them into
  ε at δ with dp-accounting (RDP or PLD);
* :mod:`~fedlearn.privacy.central` - central DP (DP-FedAvg, adaptive clipping) as a
  wrapper around a weighted-mean strategy;
* :mod:`~fedlearn.privacy.strategy` - the wrapper base, and the client-side DP wrapper
  that asks each training task for local DP or DP-SGD (``dp.*`` config keys);
* :mod:`~fedlearn.privacy.tracker` - a run's accounting: each round's events and ε, the
  budget.

Nothing is imported here: all but ``noise`` need the ``privacy`` extra (dp-accounting).
"""
