"""Deploying a federated experiment on Flower: the same config, algorithm and client update.

A deployment runs the trainer (:func:`fljax.experiment.trainer.train`) on a Flower ServerApp
with each client's update computed on its own SuperNode, next to its data:

* :mod:`fljax.deploy.server`: the server side, :class:`~fljax.deploy.server.RemoteClients`
  (the trainer's ``remote``: client updates, and secure sums by the masking protocol or CKKS,
  over the network) and :func:`~fljax.deploy.server.run`;
* :mod:`fljax.deploy.node`: a node's runtime (its shard, the jitted client update, the
  protocol's secrets);
* :mod:`fljax.deploy.flower_app`: the Flower ServerApp and ClientApp (imports ``flwr``);
* :mod:`fljax.deploy.local`: one command for a whole deployment on this machine, with TLS;
* :mod:`fljax.deploy.certs`: a CA and a server certificate; :mod:`fljax.deploy.wire`: the
  messages.

Importing :mod:`fljax.deploy` needs neither Flower nor the experiment package; only
:mod:`~fljax.deploy.flower_app` imports ``flwr`` (``pip install "fljax[deploy]"``). Guide:
``docs/deploy.md``.
"""

from fljax.deploy import certs, wire

__all__ = ["certs", "wire"]
