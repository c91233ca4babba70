"""The IKE exchanges, one task each (see :mod:`ipsecstack.ike.tasks.base`)."""
